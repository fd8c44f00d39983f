-- The latest row of a run (its last evaluation) gets the publish outcome.
UPDATE recsys_runs SET status = %(status)s, published_version = %(published_version)s
WHERE run_key = %(run_key)s
  AND recorded_at = (SELECT max(recorded_at) FROM recsys_runs WHERE run_key = %(run_key)s)
