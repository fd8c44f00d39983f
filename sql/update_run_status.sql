-- The publish outcome goes to the row the same DAG run recorded last for this run folder: two DAG
-- runs of one folder (a manual run and a backfill of the same day and params) each keep their own
-- outcome. Outside Airflow (dag_run_id NULL: `recsys publish`) it goes to the folder's own row
-- without a DAG run if there is one, else to the folder's newest row (a run Airflow evaluated).
UPDATE recsys_runs SET status = %(status)s, published_version = %(published_version)s
WHERE run_key = %(run_key)s
  AND recorded_at = (
      SELECT recorded_at FROM recsys_runs
      WHERE run_key = %(run_key)s
        AND (dag_run_id IS NOT DISTINCT FROM %(dag_run_id)s OR %(dag_run_id)s::text IS NULL)
      ORDER BY dag_run_id IS NOT DISTINCT FROM %(dag_run_id)s DESC, recorded_at DESC
      LIMIT 1
  )
