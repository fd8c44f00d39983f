-- Whether a database of this name exists on the server (Airflow's metadata database for `make airflow`).
SELECT 1 FROM pg_database WHERE datname = %(name)s
