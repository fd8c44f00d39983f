-- The publish outcome goes to the row the same DAG run (or, outside Airflow, a run without one)
-- recorded last for this run folder: two DAG runs of one folder (a manual run and a backfill of the
-- same day and params) each keep their own outcome.
UPDATE recsys_runs SET status = %(status)s, published_version = %(published_version)s
WHERE run_key = %(run_key)s
  AND recorded_at = (
      SELECT max(recorded_at) FROM recsys_runs
      WHERE run_key = %(run_key)s AND dag_run_id IS NOT DISTINCT FROM %(dag_run_id)s
  )
