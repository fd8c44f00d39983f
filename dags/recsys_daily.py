"""Daily shop recommendations: extract -> build_matrix -> train -> evaluate -> publish.

Wiring only: every task is a thin call into the ``recsys`` package; artifact paths, never
arrays, travel through XCom. The window of a run is ``[data_interval_end - lookback_days,
data_interval_end)``, so a run (scheduled, manual or backfilled) for date D never sees data
from after D, and publish refuses to replace a live version whose data is fresher.

Database and Redis come from the Airflow connections ``recsys_db`` / ``recsys_redis`` when they
exist, else from ``RECSYS_DATABASE_URL`` / ``RECSYS_REDIS_URL``.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import (
    Connection,
    CronDataIntervalTimetable,
    ExceptionRetryPolicy,
    Param,
    RetryAction,
    RetryRule,
    dag,
    task,
)
from airflow.sdk.exceptions import AirflowNotFoundException, AirflowSkipException

from recsys.params import PipelineParams

DEFAULTS = PipelineParams()

# Bad data or a refused model fails at once; only lost connections are worth a retry.
RETRY_POLICY = ExceptionRetryPolicy(
    rules=[
        RetryRule(
            exception=["recsys.errors.InputError", "recsys.errors.QualityGateError", "recsys.errors.EmptyResultError"],
            action=RetryAction.FAIL,
            reason="bad input or a refused result: retrying cannot fix it",
        ),
        RetryRule(
            exception=[
                "psycopg.OperationalError",
                "redis.exceptions.ConnectionError",
                "redis.exceptions.TimeoutError",
            ],
            action=RetryAction.RETRY,
            reason="transient database or Redis error",
        ),
    ],
)

PARAMS = {
    "lookback_days": Param(DEFAULTS.lookback_days, type="integer", minimum=2, title="Lookback (days)",
                           description="Train on interactions of this many days before the run's data interval end."),
    "holdout_days": Param(DEFAULTS.holdout_days, type="integer", minimum=1, title="Holdout (days)",
                          description="The last days of the window are held out to evaluate against popularity."),
    "factors": Param(DEFAULTS.factors, type="integer", minimum=1, maximum=1024, title="ALS factors"),
    "regularization": Param(DEFAULTS.regularization, type="number", minimum=0, title="ALS regularization"),
    "alpha": Param(DEFAULTS.alpha, type="number", minimum=0, title="ALS alpha (confidence = 1 + alpha * weight)"),
    "iterations": Param(DEFAULTS.iterations, type="integer", minimum=1, maximum=500, title="ALS iterations"),
    "confidence_scaling": Param(DEFAULTS.confidence_scaling, enum=["none", "log", "bm25"], title="Confidence scaling"),
    "event_weights": Param(DEFAULTS.event_weights, type="object", title="Event weights",
                           description="Weight per event type; other event types are dropped and reported."),
    "half_life_days": Param(DEFAULTS.half_life_days, type="number", minimum=0, title="Time decay half-life (days, 0 = off)"),
    "top_n": Param(DEFAULTS.top_n, type="integer", minimum=1, maximum=500, title="Recommendations per user"),
    "k": Param(DEFAULTS.k, type="integer", minimum=1, maximum=500, title="K of MAP@K and friends"),
    "min_lift": Param(DEFAULTS.min_lift, type="number", minimum=0, title="Quality gate: required lift over popularity",
                      description="Publish only if model MAP@K > popularity MAP@K * (1 + min_lift)."),
}


def _settings():
    from recsys.settings import Settings

    overrides = {}
    for field, conn_id in (("database_url", "recsys_db"), ("redis_url", "recsys_redis")):
        try:
            overrides[field] = Connection.get(conn_id).get_uri()
        except AirflowNotFoundException:
            pass
    return Settings(**overrides)


def _run(params: dict, data_interval_end):
    """This run's validated params, data window and artifact folders."""
    from recsys.pipeline import run_paths, window_ending

    run_params = PipelineParams.from_dict(dict(params))
    settings = _settings()
    window = window_ending(data_interval_end, run_params)
    return settings, run_params, window, run_paths(settings, window, run_params)


@dag(
    dag_id="recsys_daily",
    schedule=CronDataIntervalTimetable("0 3 * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=5), "retry_policy": RETRY_POLICY},
    tags=["recsys"],
    doc_md=__doc__,
)
def recsys_daily():
    @task
    def extract(params=None, data_interval_end=None) -> dict:
        from recsys.extract import extract as run_extract

        settings, run_params, window, paths = _run(params, data_interval_end)
        result = run_extract(settings, window, paths.extract, run_params)
        return {"interactions": str(result.interactions), "products": str(result.products),
                "rows_read": result.rows_read, "rows_kept": result.rows_kept}

    @task
    def build_matrix(extracted: dict, params=None, data_interval_end=None) -> dict:
        from pathlib import Path

        from recsys.matrix import build_matrix as run_build_matrix

        _, run_params, window, paths = _run(params, data_interval_end)
        result = run_build_matrix(Path(extracted["interactions"]), Path(extracted["products"]), window,
                                  paths.matrix, run_params)
        return {"matrix_dir": str(result.matrix_dir), "users": result.n_users, "items": result.n_items}

    @task
    def train(matrix: dict, params=None, data_interval_end=None) -> dict:
        from pathlib import Path

        from recsys.train import train as run_train

        _, run_params, _, paths = _run(params, data_interval_end)
        result = run_train(Path(matrix["matrix_dir"]), paths.model, run_params)
        return {"matrix_dir": matrix["matrix_dir"], "model_dir": str(result.model_dir)}

    @task
    def evaluate(trained: dict, params=None, data_interval_end=None) -> dict:
        """Holdout metrics for model and popularity; fails the run if the quality gate refuses."""
        from pathlib import Path

        from recsys.evaluate import enforce_quality_gate
        from recsys.evaluate import evaluate as run_evaluate

        _, run_params, _, paths = _run(params, data_interval_end)
        result = run_evaluate(Path(trained["matrix_dir"]), Path(trained["model_dir"]), paths.evaluation, run_params)
        enforce_quality_gate(result)
        return {**trained, "report": str(result.report_path), "model_map": result.model.map,
                "popularity_map": result.popularity.map}

    @task
    def publish(evaluated: dict, params=None, data_interval_end=None) -> dict:
        from pathlib import Path

        from recsys.errors import StaleVersionError
        from recsys.publish import publish as run_publish

        settings, run_params, _, _ = _run(params, data_interval_end)
        try:
            result = run_publish(settings, Path(evaluated["matrix_dir"]), Path(evaluated["model_dir"]),
                                 Path(evaluated["report"]), run_params)
        except StaleVersionError as stale:
            raise AirflowSkipException(str(stale)) from stale
        return {"version": result.version, "users": result.users}

    publish(evaluate(train(build_matrix(extract()))))


recsys_daily()
