"""The recsys DAGs: ``recsys_daily`` (recommendations) and ``recsys_tune`` (its parameters).

Wiring only: every task is a thin call into ``recsys.pipeline.stages``. Both DAGs live
in one file so they share their wiring without relying on the DAG folder being importable.

Database and Redis come from the Airflow connections ``recsys_db`` / ``recsys_redis`` when they
exist, else from ``RECSYS_DATABASE_URL`` / ``RECSYS_REDIS_URL``. The shared artifact store is
``RECSYS_ARTIFACTS_URL`` read as an ObjectStoragePath, so a connection id in it
(``s3://aws_default@bucket/recsys``) supplies the credentials.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import (
    Connection,
    CronDataIntervalTimetable,
    ExceptionRetryPolicy,
    ObjectStoragePath,
    Param,
    RetryAction,
    RetryRule,
    dag,
    get_current_context,
    task,
)
from airflow.sdk.exceptions import AirflowNotFoundException, AirflowSkipException

from recsys.core.params import PipelineParams

DEFAULTS = PipelineParams()

# Bad data or a refused model fails at once; only lost connections are worth a retry.
RETRY_POLICY = ExceptionRetryPolicy(
    rules=[
        RetryRule(
            exception=[
                "recsys.core.errors.InputError",
                "recsys.core.errors.QualityGateError",
                "recsys.core.errors.EmptyResultError",
                "recsys.core.errors.RunChangedError",
            ],
            action=RetryAction.FAIL,
            reason="bad input or a refused result: retrying cannot fix it",
        ),
        RetryRule(
            exception=[
                "psycopg.OperationalError",
                "redis.exceptions.ConnectionError",
                "redis.exceptions.TimeoutError",
                "recsys.core.errors.PublishConflictError",
                "recsys.core.errors.IncompleteVersionError",
            ],
            action=RetryAction.RETRY,
            reason="transient database or Redis error, or another publisher of the same version",
        ),
    ],
)


DEFAULT_ARGS = {"retries": 2, "retry_delay": timedelta(minutes=5), "retry_policy": RETRY_POLICY}
# what both DAGs share: one run at a time, no catch-up of missed days on unpause
DAG_SETTINGS = {
    "start_date": pendulum.datetime(2026, 1, 1, tz="UTC"),
    "catchup": False,
    "max_active_runs": 1,
    "default_args": DEFAULT_ARGS,
    "tags": ["recsys"],
}


def recsys_settings():
    """Settings from the Airflow connections ``recsys_db`` / ``recsys_redis``, else RECSYS_* env;
    the artifact store's filesystem options from the connection named in ``RECSYS_ARTIFACTS_URL``."""
    from recsys.core.settings import Settings

    overrides = {}
    for field, conn_id in (("database_url", "recsys_db"), ("redis_url", "recsys_redis")):
        try:
            overrides[field] = Connection.get(conn_id).get_uri()
        except AirflowNotFoundException:
            pass
    settings = Settings(**overrides)
    if not settings.artifacts_url:
        return settings
    # fsspec rebuilds (or reuses) a filesystem from its storage options: recsys gets the one
    # Airflow made from the connection without importing Airflow
    store = ObjectStoragePath(settings.artifacts_url)
    return settings.model_copy(
        update={
            "artifacts_url": f"{store.protocol}://{store.path}",
            "artifacts_storage_options": {**settings.artifacts_storage_options, **store.fs.storage_options},
        }
    )


def planned(run: dict, settings):
    """The run a previous task planned, from its XCom, with this worker's folders and store."""
    from recsys.pipeline.stages import Run

    return Run.from_dict(run, settings)


DAILY_DOC = """Daily shop recommendations: extract -> build_matrix -> train -> evaluate ->
prepare_publish -> publish_shard (mapped over ``publish_shards`` user shards) -> publish.

Wiring only: every task is a thin call into ``recsys.pipeline``; the run (effective params, data
window, hence its artifact folder) is fixed once by ``extract`` and travels through XCom as a small
dict, never arrays. With ``RECSYS_ARTIFACTS_URL`` set, each task pulls the folders it reads from
that shared store and pushes the one it writes, so tasks and shards can run on any worker.

The window is ``[data_interval_end - lookback_days, data_interval_end)``, so a run (scheduled,
manual or backfilled) for date D never sees data from after D, and publish refuses to replace a
live version whose data is fresher (the task is skipped, saying why).

Params left at their defaults take the values the ``recsys_tune`` DAG chose, unless
``use_tuned_params`` is off. Database and Redis come from the Airflow connections ``recsys_db`` /
``recsys_redis`` when they exist, else from ``RECSYS_DATABASE_URL`` / ``RECSYS_REDIS_URL``.
"""

TUNE_DOC = """Tune ALS on the shop's recent data: extract -> build_matrix -> tune.

Fits on the window before the holdout cutoff and validates on what happened after it (MAP@K,
the daily quality gate's metric). The chosen factors / regularization / alpha / iterations /
confidence scaling are stored with their validation metrics and data window in
``tuned/latest.json`` of the artifacts (of the shared store when ``RECSYS_ARTIFACTS_URL`` is set);
``recsys_daily`` uses them for every param left at its default. Weekly on Sunday (unpause to
enable) or triggered with a trial budget.
"""


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
    "diversity_lambda": Param(DEFAULTS.diversity_lambda, type="number", minimum=0, maximum=1,
                              title="Diversity of user lists (MMR lambda, 0 = off)",
                              description="Trade score for variety: each next pick is penalised by its similarity to the ones before."),
    "k": Param(DEFAULTS.k, type="integer", minimum=1, maximum=500, title="K of MAP@K and friends"),
    "min_lift": Param(DEFAULTS.min_lift, type="number", minimum=0, title="Quality gate: required lift over popularity",
                      description="Publish only if model MAP@K > popularity MAP@K * (1 + min_lift)."),
    "max_map_drop": Param(DEFAULTS.max_map_drop, type="number", minimum=0, maximum=1,
                          title="Quality gate: largest allowed MAP@K drop vs the live model (fraction)"),
    "use_tuned_params": Param(True, type="boolean", title="Use tuned params",
                              description="Fields left at their defaults take the values the recsys_tune DAG chose."),
    "publish_shards": Param(1, type="integer", minimum=1, maximum=256, title="Publish shards",
                            description="Users are scored and written by this many parallel mapped tasks."),
}
# Params that steer the Airflow run rather than the model (not part of the params fingerprint).
RUN_PARAMS = ("use_tuned_params", "publish_shards")


@task
def build_matrix(run: dict) -> dict:
    """Shared by both DAGs: the run's id maps and weighted matrices from its extract."""
    from recsys.pipeline.stages import matrix_stage

    settings = recsys_settings()
    matrix_stage(settings, planned(run, settings))
    return run


@dag(
    dag_id="recsys_daily",
    schedule=CronDataIntervalTimetable("0 3 * * *", timezone="UTC"),
    params=PARAMS,
    doc_md=DAILY_DOC,
    **DAG_SETTINGS,
)
def recsys_daily():
    @task
    def extract(params=None, data_interval_end=None) -> dict:
        """Fix the run (effective params, window, folder) and extract its interactions."""
        from recsys.pipeline.stages import extract_stage, plan_run

        values = dict(params)
        steering = {name: values.pop(name) for name in RUN_PARAMS}
        settings = recsys_settings()
        run = plan_run(settings, data_interval_end, PipelineParams.from_dict(values), steering["use_tuned_params"])
        result = extract_stage(settings, run)
        return {**run.to_dict(), "shards": steering["publish_shards"], "rows_read": result.rows_read,
                "rows_kept": result.rows_kept}

    @task
    def train(run: dict) -> dict:
        from recsys.pipeline.stages import train_stage

        settings = recsys_settings()
        train_stage(settings, planned(run, settings))
        return run

    @task
    def evaluate(run: dict) -> dict:
        """Holdout metrics for model and popularity; fails the run if the quality gate refuses."""
        from recsys.pipeline.stages import evaluate_stage

        settings = recsys_settings()
        result = evaluate_stage(settings, planned(run, settings))
        return {**run, "model_map": result.model.map, "popularity_map": result.popularity.map}

    @task
    def prepare_publish(run: dict) -> list[dict]:
        """Start a publish attempt: stage products' lists; one job per user shard. A run older than
        the live version is skipped here."""
        from recsys.core.errors import StaleVersionError
        from recsys.pipeline.stages import prepare_publish_stage

        settings = recsys_settings()
        try:
            _, attempt = prepare_publish_stage(settings, planned(run, settings))
        except StaleVersionError as stale:
            raise AirflowSkipException(str(stale)) from stale
        return [{"run": run, "attempt": attempt, "shard": shard} for shard in range(run["shards"])]

    @task(map_index_template="{{ shard_label }}")
    def publish_shard(job: dict) -> dict:
        from dataclasses import asdict

        from recsys.pipeline.stages import publish_shard_stage

        run = job["run"]
        get_current_context()["shard_label"] = f"shard {job['shard'] + 1} of {run['shards']}"
        settings = recsys_settings()
        result = publish_shard_stage(settings, planned(run, settings), job["attempt"], job["shard"], run["shards"])
        return asdict(result)

    @task
    def publish(run: dict, shard_results: list[dict]) -> dict:
        """Check every shard (staging again what a Redis restart lost), then switch the new version
        live atomically."""
        from recsys.core.errors import StaleVersionError
        from recsys.pipeline.publish.stage import ShardResult
        from recsys.pipeline.stages import finish_publish_stage

        results = [ShardResult(**result) for result in shard_results]
        settings = recsys_settings()
        try:
            result = finish_publish_stage(settings, planned(run, settings), results[0].attempt, results, run["shards"])
        except StaleVersionError as stale:
            raise AirflowSkipException(str(stale)) from stale
        return {"version": result.version, "users": result.users}

    evaluated = evaluate(train(build_matrix(extract())))
    shards = publish_shard.expand(job=prepare_publish(evaluated))
    publish(evaluated, shards)


recsys_daily()


@dag(
    dag_id="recsys_tune",
    schedule=CronDataIntervalTimetable("0 4 * * 0", timezone="UTC"),
    params={
        "n_trials": Param(40, type="integer", minimum=1, maximum=1000, title="Trials (the search budget)"),
        "lookback_days": Param(DEFAULTS.lookback_days, type="integer", minimum=2, title="Lookback (days)"),
        "holdout_days": Param(DEFAULTS.holdout_days, type="integer", minimum=1, title="Validation (last days)"),
    },
    doc_md=TUNE_DOC,
    **DAG_SETTINGS,
)
def recsys_tune():
    @task
    def extract(params=None, data_interval_end=None) -> dict:
        from recsys.pipeline.stages import extract_stage, plan_run

        # raw weights: the search itself chooses the confidence scaling
        search_params = PipelineParams(
            lookback_days=params["lookback_days"], holdout_days=params["holdout_days"], confidence_scaling="none"
        )
        settings = recsys_settings()
        run = plan_run(settings, data_interval_end, search_params, use_tuned=False)
        extract_stage(settings, run)
        return run.to_dict()

    @task(execution_timeout=timedelta(hours=6))
    def tune(run: dict, params=None) -> dict:
        from recsys.pipeline.stages import tune_stage

        settings = recsys_settings()
        tuned = tune_stage(settings, planned(run, settings), params["n_trials"])
        return {"params": tuned.params, "validation": tuned.validation}

    tune(build_matrix(extract()))


recsys_tune()
