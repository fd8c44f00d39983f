-- Which run published a version (its DAG run id; NULL outside Airflow), if the history knows.
SELECT dag_run_id FROM recsys_runs
WHERE published_version = %(version)s AND status = 'published'
ORDER BY recorded_at DESC
LIMIT 1
