"""Batch recommender for online shops: Postgres -> implicit ALS -> Redis.

One module per pipeline stage (extract, matrix, train, evaluate, publish); none of them imports
Airflow, so every stage runs the same from the ``recsys`` command, from tests and from the DAG.
"""

__version__ = "0.1.0"
