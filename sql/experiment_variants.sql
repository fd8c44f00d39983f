-- The control first (position 0).
SELECT name, share, params, stopped_at, stop_reason
FROM experiment_variants
WHERE experiment = %(name)s
ORDER BY position
