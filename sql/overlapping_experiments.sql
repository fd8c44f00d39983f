-- An experiment not stopped and not ended by now whose running time meets [starts_at, ends_at)
-- (a NULL end is open).
SELECT name, ends_at
FROM experiments
WHERE stopped_at IS NULL
  AND (ends_at IS NULL OR ends_at > %(now)s)
  AND (ends_at IS NULL OR ends_at > %(starts_at)s)
  AND (%(ends_at)s::timestamptz IS NULL OR starts_at < %(ends_at)s::timestamptz)
ORDER BY starts_at
LIMIT 1
