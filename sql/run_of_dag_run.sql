-- The run folder an Airflow DAG run evaluated (its latest row: a cleared evaluate adds one), for
-- the link from the run's evaluate task to its report.
SELECT run_key FROM recsys_runs WHERE dag_run_id = %(dag_run_id)s ORDER BY recorded_at DESC LIMIT 1
