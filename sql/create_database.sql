-- A database for Airflow's metadata next to the shop's (`make airflow`); {database} is a quoted identifier.
CREATE DATABASE {database}
