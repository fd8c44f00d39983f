"""The recsys DAGs: ``recsys_daily`` (recommendations) and ``recsys_tune`` (its parameters).

Wiring only: every task is a thin call into ``recsys.pipeline.stages``. Both DAGs live
in one file so they share their wiring without relying on the DAG folder being importable.

Database and Redis come from the Airflow connections ``recsys_db`` / ``recsys_redis`` when they
exist, else from ``RECSYS_DATABASE_URL`` / ``RECSYS_REDIS_URL``. The shared artifact store is
``RECSYS_ARTIFACTS_URL`` read as an ObjectStoragePath, so a connection id in it
(``s3://aws_default@bucket/recsys``) supplies the credentials.
"""

from __future__ import annotations

import importlib
import logging
import os
from datetime import timedelta

import pendulum
from airflow.sdk import (
    Asset,
    BaseNotifier,
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

log = logging.getLogger(__name__)
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


# What the DAGs produce, for DAGs scheduled on them (dags/examples/after_publish.py): the live
# recommendations (an event per publish, extra: version, data window, metrics, run folder) and the
# tuned params (an event per tune, extra: result id, whether it became active and why).
REDIS_PREFIX = os.environ.get("RECSYS_REDIS_PREFIX", "recsys")
LIVE_ASSET = Asset(f"recsys://{REDIS_PREFIX}/live", group="recsys")
TUNED_ASSET = Asset(f"recsys://{REDIS_PREFIX}/tuned", group="recsys")

alerts_log = logging.getLogger("recsys.alerts")


class RunAlert(BaseNotifier):
    """The default alert: one WARNING line on the ``recsys.alerts`` logger naming the run, the task
    and what happened (a refused gate, a failure, a skipped publish) and what to do."""

    def __init__(self, skipped: bool = False):
        super().__init__()
        self.skipped = skipped

    def notify(self, context) -> None:
        alerts_log.warning("recsys alert: %s", alert_text(context, self.skipped))


def alert_text(context, skipped: bool) -> str:
    from recsys.core.errors import QualityGateError

    ti, error = context["ti"], context.get("exception")
    where = f"{ti.dag_id} run {context['run_id']} task {ti.task_id}"
    if skipped:
        return (f"{where}: publish skipped, the live version holds fresher data (a backfill?); the run was "
                "evaluated and recorded in recsys_runs")
    if isinstance(error, QualityGateError):
        return (f"{where}: the quality gate refused the model, nothing was published, the live version stays. "
                f"{error}. See the run's evaluation report (the evaluate task's log names it) and `recsys history`.")
    return f"{where} failed: {type(error).__name__}: {error}. The task's log has the details."


def alert_notifiers(skipped: bool = False) -> list:
    """The default log line, plus the notifier(s) ``RECSYS_ALERT_NOTIFIER=package.module:factory``
    returns (e.g. a Slack or SMTP notifier of an Airflow provider); the factory gets ``skipped``."""
    configured = os.environ.get("RECSYS_ALERT_NOTIFIER")
    if not configured:
        return [RunAlert(skipped)]
    module, _, name = configured.partition(":")
    extra = getattr(importlib.import_module(module), name)(skipped=skipped)
    return [RunAlert(skipped), *(extra if isinstance(extra, list) else [extra])]


ALERTS, SKIP_ALERTS = alert_notifiers(), alert_notifiers(skipped=True)


def record_failed_publish(context) -> None:
    """A publish task failed after evaluate recorded the run: its history row says failed."""
    from recsys.pipeline import history

    run = context["ti"].xcom_pull(task_ids="evaluate")
    if run is not None:
        settings = recsys_settings()
        history.record_publish(settings, planned(run, settings).paths.key, history.FAILED)


DEFAULT_ARGS = {
    "retries": 2,
    "retry_delay": timedelta(minutes=5),
    "retry_policy": RETRY_POLICY,
    "on_failure_callback": ALERTS,
}
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
    store = ObjectStoragePath(settings.artifacts_url)
    if store.conn_id is None:
        # no connection named: fsspec opens the URL itself, with RECSYS_ARTIFACTS_STORAGE_OPTIONS and
        # the scheme's usual credentials (AWS_*, instance role), no Airflow provider needed
        return settings
    # fsspec rebuilds (or reuses) a filesystem from its storage options: recsys gets the one
    # Airflow made from the connection without importing Airflow
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

**What a run does.** It reads the interactions of ``[data_interval_end - lookback_days,
data_interval_end)`` from the shop's PostgreSQL (``extract``; rows it drops are counted by reason),
builds the user x product matrices, trains ALS twice (before the holdout cutoff, to evaluate; on
everything, to publish), compares the holdout model with a popularity baseline (``evaluate``: the
quality gate), and writes the recommendations, similar products, bought-together lists and top
buys to Redis under a new version that goes live atomically (``publish``), with the merchandising
rules in force at publish applied (``recsys rules list``; docs/rules.md). A run (scheduled, manual
or backfilled) for date D never sees data from after D.

**What it leaves for you.** ``evaluate`` records the run in the ``recsys_runs`` table
(``recsys history``) and writes ``eval/report.html`` with the run's artifacts: metrics vs
popularity, the last runs against the gate, popularity bias, categories, data quality, training
time. The evaluate task's log and its XCom name the report's location. A publish updates the run's
history row (published / skipped_stale / failed) and emits the ``recsys://<prefix>/live`` asset
(extra: version, window, metrics), which other DAGs can be scheduled on.

**Params.** ``lookback_days`` / ``holdout_days``: the data window and the days held out to evaluate;
``factors``, ``regularization``, ``alpha``, ``iterations``, ``confidence_scaling``: ALS (left at
their defaults they take the tuned values unless ``use_tuned_params`` is off); ``event_weights``:
weight per event type (others dropped); ``half_life_days``: time decay; ``top_n``: list length;
``k``: K of the metrics; ``min_lift`` / ``max_map_drop``: the gate; ``publish_shards``: parallel
publish tasks.

**When the gate refuses** (evaluate fails with "quality gate refused", nothing is published, the
live version keeps serving): open the run's report. A one-off dip while popularity looks normal
is usually the data: compare the extract's counts with earlier runs in the report or in
``recsys history``. A steady slide over several runs wants new params: trigger ``recsys_tune``.
If the model is good but the live one was unusually strong, a rerun with a larger
``max_map_drop`` publishes it. Each refusal, failure and skipped publish also raises an alert
(a ``recsys.alerts`` WARNING line; more notifiers with ``RECSYS_ALERT_NOTIFIER``).

**Backfills.** A run whose window ends before the live version's data says so in its first task's
log ("will not publish"), evaluates for the history, and its publish is skipped.

Database and Redis come from the Airflow connections ``recsys_db`` / ``recsys_redis`` when they
exist, else from ``RECSYS_DATABASE_URL`` / ``RECSYS_REDIS_URL``.
"""

TUNE_DOC = """Tune ALS on the shop's recent data: extract -> build_matrix -> tune.

**What it does.** Fits on the window before the holdout cutoff and validates on what happened
after it (MAP@K, the daily quality gate's metric), starting the search from the active tuned
params. Every result is kept as ``tuned/result-<time>-<id>.json`` of the artifacts (of the shared
store when ``RECSYS_ARTIFACTS_URL`` is set); it becomes active (``tuned/latest.json``, what
``recsys_daily`` uses for every param left at its default) only if it beats the active params on
a comparable validation window, or if those are older than ``RECSYS_TUNED_MAX_AGE_DAYS``
(default 28). Concurrent tunes take turns for that step under a Redis lock. The tune task's log
and ``recsys show`` say which result is active and why.

**When it runs.** Only when triggered (``schedule=None``): a scheduled DAG that is paused and
then triggered is unpaused by the trigger and at once gets its latest scheduled run too, i.e.
two tunes. Trigger it with a budget after a catalogue or traffic change, or from your own
scheduler (``airflow dags trigger recsys_tune``).

**Params.** ``n_trials``: the search budget (ALS fits; about 1-2 s each on the demo shop);
``lookback_days`` / ``holdout_days``: the data window and the validation days at its end.
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
    @task(inlets=[TUNED_ASSET])
    def extract(params=None, data_interval_end=None, inlet_events=None) -> dict:
        """Fix the run (effective params, window, folder) and extract its interactions."""
        from recsys.pipeline.stages import extract_stage, plan_run, publish_blocker

        values = dict(params)
        steering = {name: values.pop(name) for name in RUN_PARAMS}
        settings = recsys_settings()
        run = plan_run(settings, data_interval_end, PipelineParams.from_dict(values), steering["use_tuned_params"])
        tune_events = inlet_events[TUNED_ASSET]
        if tune_events:  # recorded with the run: which tune last reported, and what it decided
            log.info("last tune: %s", tune_events[-1].extra)
        blocker = publish_blocker(settings, run)
        if blocker:
            log.warning("backfill: %s", blocker)
        result = extract_stage(settings, run)
        return {**run.to_dict(), "shards": steering["publish_shards"], "rows_read": result.rows_read,
                "rows_kept": result.rows_kept, "will_not_publish": blocker}

    @task
    def train(run: dict) -> dict:
        from recsys.pipeline.stages import train_stage

        settings = recsys_settings()
        train_stage(settings, planned(run, settings))
        return run

    @task
    def evaluate(run: dict, run_id=None) -> dict:
        """Holdout metrics for model and popularity, recorded in recsys_runs with the HTML report;
        fails the run if the quality gate refuses."""
        from recsys.core.layout import EVALUATION_HTML
        from recsys.pipeline.stages import evaluate_stage, report_location

        settings = recsys_settings()
        planned_run = planned(run, settings)
        try:
            result = evaluate_stage(settings, planned_run, dag_run_id=run_id)
        finally:  # a refused run's report matters most
            if (planned_run.paths.evaluation / EVALUATION_HTML).exists():
                log.info("evaluation report: %s", report_location(planned_run))
        return {**run, "model_map": result.model.map, "popularity_map": result.popularity.map,
                "report": report_location(planned_run)}

    @task(on_failure_callback=[*ALERTS, record_failed_publish], on_skipped_callback=SKIP_ALERTS)
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

    @task(map_index_template="{{ shard_label }}", on_failure_callback=[*ALERTS, record_failed_publish])
    def publish_shard(job: dict) -> dict:
        from dataclasses import asdict

        from recsys.pipeline.stages import publish_shard_stage

        run = job["run"]
        get_current_context()["shard_label"] = f"shard {job['shard'] + 1} of {run['shards']}"
        settings = recsys_settings()
        result = publish_shard_stage(settings, planned(run, settings), job["attempt"], job["shard"], run["shards"])
        return asdict(result)

    @task(outlets=[LIVE_ASSET], on_failure_callback=[*ALERTS, record_failed_publish], on_skipped_callback=SKIP_ALERTS)
    def publish(run: dict, shard_results: list[dict], outlet_events=None) -> dict:
        """Check every shard (staging again what a Redis restart lost), then switch the new version
        live atomically; the live asset's event carries the version and its metrics."""
        from recsys.core.errors import StaleVersionError
        from recsys.pipeline.publish.stage import ShardResult
        from recsys.pipeline.stages import finish_publish_stage

        # by index up to its length: iterating the lazy sequence probes one past the end, which the
        # API client logs as an error ("XCom not found ... publish_shard")
        results = [ShardResult(**shard_results[index]) for index in range(len(shard_results))]
        settings = recsys_settings()
        try:
            result = finish_publish_stage(settings, planned(run, settings), results[0].attempt, results, run["shards"])
        except StaleVersionError as stale:
            raise AirflowSkipException(str(stale)) from stale
        outlet_events[LIVE_ASSET].extra = {
            "version": result.version, "window": run["window"], "run_key": planned(run, settings).paths.key,
            "metrics": {"model_map": run["model_map"], "popularity_map": run["popularity_map"]}, "users": result.users,
        }
        return {"version": result.version, "users": result.users}

    evaluated = evaluate(train(build_matrix(extract())))
    shards = publish_shard.expand(job=prepare_publish(evaluated))
    publish(evaluated, shards)


recsys_daily()


@dag(
    dag_id="recsys_tune",
    schedule=None,  # triggered only: see TUNE_DOC ("When it runs")
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
    def extract(params=None, data_interval_end=None, dag_run=None) -> dict:
        from recsys.pipeline.stages import extract_stage, plan_run

        # an unscheduled DAG's manual run may have no data interval: its window ends when it was triggered
        end = data_interval_end or dag_run.run_after
        # raw weights: the search itself chooses the confidence scaling
        search_params = PipelineParams(
            lookback_days=params["lookback_days"], holdout_days=params["holdout_days"], confidence_scaling="none"
        )
        settings = recsys_settings()
        run = plan_run(settings, end, search_params, use_tuned=False)
        extract_stage(settings, run)
        return run.to_dict()

    @task(execution_timeout=timedelta(hours=6), outlets=[TUNED_ASSET])
    def tune(run: dict, params=None, outlet_events=None) -> dict:
        from recsys.pipeline.stages import tune_stage

        settings = recsys_settings()
        tuned = tune_stage(settings, planned(run, settings), params["n_trials"])
        outlet_events[TUNED_ASSET].extra = {"result_id": tuned.result_id, "map": tuned.map, "decision": tuned.decision}
        return {"result_id": tuned.result_id, "params": tuned.params, "map": tuned.map, "decision": tuned.decision}

    tune(build_matrix(extract()))


recsys_tune()
