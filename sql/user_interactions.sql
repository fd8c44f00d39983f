-- One user's recorded interactions since the live version's window start, newest first, for a
-- fold-in on request, and the user's negative feedback (%(negative_types)s, a text array) of any
-- age: it keeps products away for good. Capped by %(limit)s so one very active user (or a bot)
-- cannot make a request arbitrarily expensive. Wants an index on (user_id, occurred_at) on a large shop.
SELECT product_id::text,
       event_type,
       value,
       extract(epoch FROM occurred_at)::double precision AS occurred_at_epoch
FROM interactions
WHERE user_id = %(user_id)s
  AND (occurred_at >= %(start)s OR event_type = ANY(%(negative_types)s))
  AND product_id IS NOT NULL
  AND event_type IS NOT NULL
ORDER BY occurred_at DESC
LIMIT %(limit)s
