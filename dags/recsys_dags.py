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
from datetime import datetime, timedelta

import pendulum
from airflow.sdk import (
    Asset,
    BaseNotifier,
    BaseOperatorLink,
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

from recsys.core.params import MODEL_FAMILIES, TUNE_REPEATS, PipelineParams
from recsys.serving.links import airflow_run_report_link

# not __name__: Airflow loads DAG files under a mangled module name (unusual_prefix_<hash>_...)
log = logging.getLogger("recsys.dags")
DEFAULTS = PipelineParams()
DAILY_SCHEDULE = "0 3 * * *"  # UTC


class ExpectedFailure(SystemExit):
    """Fails a task on an expected outcome (the quality gate refused the model, a shard left no
    result) after the task logged it in one line. Airflow's task runner logs a SystemExit as one
    "Task exited" line and any other exception with its traceback; the retry policy fails it at
    once. ``error`` is the outcome, for the alert; the exit code names its kind."""

    def __init__(self, error: Exception):
        super().__init__(type(error).__name__)
        self.error = error

    def __str__(self) -> str:  # what a notifier shows of context["exception"]
        return str(self.error)

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
            exception=[SystemExit],  # ExpectedFailure, by its importable base (the DAG module's name is not)
            action=RetryAction.FAIL,
            reason="an expected outcome, said in the task's log: retrying cannot change it",
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


# What the DAGs produce, for DAGs scheduled on them (dags/examples/recsys_after_publish.py): the live
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


# the context key of an alert raised by a task that goes on (a guardrail stop): its text
ALERT_KEY = "recsys_alert"


def alert_text(context, skipped: bool) -> str:
    from recsys.core.errors import QualityGateError

    ti, error = context["ti"], context.get("exception")
    error = getattr(error, "error", error)  # an ExpectedFailure's outcome
    where = f"{ti.dag_id} run {context['run_id']} task {ti.task_id}"
    if context.get(ALERT_KEY):
        return f"{where}: {context[ALERT_KEY]}"
    if skipped:
        return (f"{where}: not published (the live version holds newer data, or a manual run's version of the "
                "same window); the publish task's log says which. The run was evaluated and recorded in recsys_runs")
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


def send_alert(text: str) -> None:
    """Alert through the DAG's notifiers from a task that goes on (it does not fail the run): the
    text reaches them as the context's ``recsys_alert``."""
    context = {**get_current_context(), ALERT_KEY: text}
    for notifier in ALERTS:
        notifier(context)


def record_failed_publish(context) -> None:
    """A publish task failed after evaluate recorded the run: its history row says failed, unless
    this run's publish attempt switched its version live before the task was stopped (then it is
    recorded as published, as Redis says, with the run's published marker)."""
    from recsys.pipeline import stages

    ti = context["ti"]
    run = ti.xcom_pull(task_ids="evaluate")
    if run is None:
        return
    settings = recsys_settings()
    jobs = ti.xcom_pull(task_ids="prepare_publish") or []
    attempt = jobs[0]["attempt"] if jobs else None
    switched = stages.record_failed_publish(settings, planned(run, settings), attempt, context["run_id"])
    if switched is not None:
        log.warning("task %s failed, but this run's publish had switched version %s live at %s: it stays live "
                    "(recorded as published; `recsys rollback` undoes it). The live asset got no event for it.",
                    ti.task_id, switched.version, switched.published_at)


class EvaluationReportLink(BaseOperatorLink):
    """The evaluate task's extra link: the run's evaluation report, served over http by the look-up
    page's app in the api-server from the artifact store (so it opens whichever worker evaluated)."""

    name = "Evaluation report"

    def get_link(self, operator, *, ti_key) -> str:
        return airflow_run_report_link(ti_key.run_id)


def window_end(data_interval_end: datetime | None, run_after: datetime) -> datetime:
    """The run's data window end: its data interval's end. A run triggered without a logical date
    (``airflow dags trigger`` without one, the REST API with ``"logical_date": null``) has no data
    interval: it gets the one a manual trigger at ``run_after`` gets, ending at the last scheduled
    time (03:00 UTC) at or before it."""
    if data_interval_end is not None:
        return data_interval_end
    from croniter import croniter

    previous = croniter(DAILY_SCHEDULE, run_after).get_prev(datetime)
    return run_after if croniter(DAILY_SCHEDULE, previous).get_next(datetime) == run_after else previous


DEFAULT_ARGS = {
    "retries": 2,
    "retry_delay": timedelta(minutes=5),
    "retry_policy": RETRY_POLICY,
    "on_failure_callback": ALERTS,
    # each task logs a one-line summary instead of its whole XCom
    "show_return_value_in_logs": False,
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
prepare_publish -> publish_shard (mapped over ``publish_shards`` user shards) -> publish; and
extract -> analyse_experiment -> train.

**What a run does.** It reads the interactions of ``[data_interval_end - lookback_days,
data_interval_end)`` from the shop's PostgreSQL (``extract``; rows it drops are counted by reason),
builds the user x product matrices, trains ALS twice (before the holdout cutoff, to evaluate; on
everything, to publish), compares the holdout model with a popularity baseline (``evaluate``: the
quality gate), and writes the recommendations, similar products, bought-together lists and top
buys to Redis under a new version that goes live atomically (``publish``), with the merchandising
rules in force at publish applied (``recsys rules list``; docs/rules.md). A run (scheduled, manual
or backfilled) for date D never sees data from after D.

**Experiments** (docs/experiments.md). ``analyse_experiment`` analyses the A/B test running now
(as ``recsys experiments report NAME``) before ``train`` snapshots it: a variant a guardrail finds
significantly worse is stopped there and recorded, so this run's publish serves its users the
control. A stop or a sample-ratio mismatch raises an alert (the run goes on); the analysis is the
run's ``experiment/analysis.json`` and the Experiment section of its report. No experiment: a no-op.

**What it leaves for you.** ``evaluate`` records the run in the ``recsys_runs`` table
(``recsys history``, and the chart of *Browse > Recommendations*) and writes ``eval/report.html``
with the run's artifacts: metrics vs popularity, the last runs against their gates, popularity
bias, categories, data quality, training time. Open it with the evaluate task's extra link
**Evaluation report** (served by the api-server from the artifact store). A publish updates the
run's history row (published / skipped_stale / failed) and emits the ``recsys://<prefix>/live``
asset (extra: version, window, metrics), which other DAGs can be scheduled on
(``dags/examples/recsys_after_publish.py``).

**Triggering by hand.** *Trigger* runs the window ending at the last 03:00 UTC (the same window
as that day's scheduled run) with the params of the form. If the DAG is paused and *Unpause on
trigger* is ticked, the scheduler also starts that day's scheduled run, with default params. Both
evaluate; the version of your manual run is the one left live, whichever finishes last: a
scheduled run does not replace a live version of its own window that a manual run, a backfill or
``recsys run`` published (its publish task says so and is skipped). Untick *Unpause on trigger*
to get only your run.

**Params.** ``lookback_days`` / ``holdout_days``: the data window and the days held out to evaluate;
``factors``, ``regularization``, ``alpha``, ``iterations``, ``confidence_scaling``: ALS (left at
their defaults they take the tuned values unless ``use_tuned_params`` is off); ``event_weights``:
weight per event type (others dropped); ``half_life_days``: time decay; ``top_n``: list length;
``diversity_lambda``: variety of the lists; ``ann_scoring`` / ``ann_min_items``: approximate
top-N for large catalogues; ``k``: K of the metrics; ``min_lift`` /
``max_map_drop``: the gate; ``publish_shards``: parallel publish tasks.

**When the gate refuses** (evaluate fails with one line "quality gate refused: ...", nothing is
published, the live version keeps serving): open the run's report. A one-off dip while popularity
looks normal is usually the data: compare the extract's counts with earlier runs in the report or
in ``recsys history``. A steady slide over several runs wants new params: trigger ``recsys_tune``.
If the model is good but the live one was unusually strong, a rerun with a larger
``max_map_drop`` publishes it. Each refusal, failure and skipped publish also raises an alert
(a ``recsys.alerts`` WARNING line; more notifiers with ``RECSYS_ALERT_NOTIFIER``).

**Not published.** A run whose window ends before the live version's data (a backfill) says so in
its extract's log ("will not publish"), evaluates for the history, and its ``publish`` task logs
why and is skipped (no asset event). Clearing ``publish`` of a run makes its version live again
even if another run of the same window published since (like ``recsys rollback``), unless that
run is a scheduled one and the live version a manual run's. A ``publish`` marked failed while it
ran may have switched its version already (``recsys versions``): clearing it records that switch
and emits the asset event, without publishing again.

Database and Redis come from the Airflow connections ``recsys_db`` / ``recsys_redis`` when they
exist, else from ``RECSYS_DATABASE_URL`` / ``RECSYS_REDIS_URL``.
"""

TUNE_DOC = """Tune the model families on the shop's recent data: extract -> build_matrix -> tune.

**What it does.** Fits on the window before the holdout cutoff and validates on what happened
after it (MAP@K, the daily quality gate's metric): ALS first (it also chooses the confidence
scaling every family fits on), then each other family of ``models`` on that scaling, each search
starting from that family's active tuned params. Seeded, one BLAS thread per trial, each trial
the mean of ``repeats`` fits (with its sd): two tunes of the same window give the same params and
numbers. Every result is kept as ``tuned/result-<time>-<id>.json`` of the artifacts (of the shared
store when ``RECSYS_ARTIFACTS_URL`` is set); it becomes active (``tuned/latest.json``, what
``recsys_daily`` uses for every param left at its default, ``family_params`` per family) only if
no family is worse and one is better than the active params on a comparable validation window,
or if those are older than ``RECSYS_TUNED_MAX_AGE_DAYS`` (default 28). A family not tuned this
time keeps its active values. Concurrent tunes take turns for that step under a Redis lock. The
tune task's log and ``recsys show`` say which result is active and why.

**When it runs.** Only when triggered (``schedule=None``: a paused scheduled DAG that is
triggered would also start its latest scheduled run, i.e. two tunes), on the window ending when it
is triggered. Trigger it with a budget after a catalogue or traffic change, or from your own
scheduler (``airflow dags trigger recsys_tune``).

**Params.** ``n_trials``: the search budget per family (about 1-2 s per ALS fit on the demo
shop); ``repeats``: fits per trial; ``models``: the families to tune (the daily run's);
``lookback_days`` / ``holdout_days``: the data window and the validation days at its end.
"""

ALS_DEFAULTS_NOTE = " Left at the default, the value recsys_tune chose is used (see Use tuned params)."

PARAMS = {
    "lookback_days": Param(DEFAULTS.lookback_days, type="integer", minimum=2, title="Lookback (days)",
                           description="Train on interactions of this many days before the run's data interval end."),
    "holdout_days": Param(DEFAULTS.holdout_days, type="integer", minimum=1, title="Holdout (days)",
                          description="The last days of the window are held out to evaluate against popularity."),
    "factors": Param(DEFAULTS.factors, type="integer", minimum=1, maximum=1024, title="ALS factors",
                     description="Latent factors per user and product: more fit finer tastes, train slower and can "
                                 "overfit a small shop." + ALS_DEFAULTS_NOTE),
    "regularization": Param(DEFAULTS.regularization, type="number", minimum=0, title="ALS regularization",
                            description="L2 penalty on the factors: higher fits the history less closely (less overfitting, "
                                        "less personal lists)."
                                        + ALS_DEFAULTS_NOTE),
    "alpha": Param(DEFAULTS.alpha, type="number", minimum=0, title="ALS alpha (confidence = 1 + alpha * weight)",
                   description="Confidence of an observed interaction: 1 + alpha x its weight (an unobserved one has "
                               "1)." + ALS_DEFAULTS_NOTE),
    "iterations": Param(DEFAULTS.iterations, type="integer", minimum=1, maximum=500, title="ALS iterations",
                        description="Alternating least-squares sweeps; training time grows linearly."
                                    + ALS_DEFAULTS_NOTE),
    "confidence_scaling": Param(DEFAULTS.confidence_scaling, enum=["none", "log", "bm25"], title="Confidence scaling",
                                description="How summed weights become confidence: none (raw), log (log1p) or "
                                            "bm25 (damps heavy users and very popular products)." + ALS_DEFAULTS_NOTE),
    "family_params": Param(DEFAULTS.family_params, type="object", title="Settings of the other families",
                           description="Per family, e.g. {\"ease\": {\"regularization\": 500}}: bpr, item_knn, ease "
                                       "(the rest of a family's settings: its defaults). A family left out takes "
                                       "the values recsys_tune chose (see Use tuned params)."),
    "models": Param(list(DEFAULTS.models), type="array", items={"enum": list(MODEL_FAMILIES)}, minItems=1,
                    title="Model families to choose among",
                    description="Train fits each and keeps the best MAP@K on a random quarter of each user's "
                                "pre-holdout items (the holdout stays the gate's): als, bpr, item_knn, ease (both "
                                "skip a catalogue over 20k products), mult_dae (an autoencoder; its fit grows with users x "
                                "products x epochs), blend (of the two best). [\"als\"] alone: no "
                                "choice, as before."),
    "event_weights": Param(DEFAULTS.event_weights, type="object", title="Event weights",
                           description="Weight per event type; other event types are dropped and reported."),
    "half_life_days": Param(DEFAULTS.half_life_days, type="number", minimum=0, title="Time decay half-life (days, 0 = off)",
                            description="An interaction's weight halves every this many days before the window end; "
                                        "0 weighs the whole window alike."),
    "top_n": Param(DEFAULTS.top_n, type="integer", minimum=1, maximum=500, title="Recommendations per user",
                   description="Length of each user's published list (the API serves at most this many)."),
    "new_arrival_slots": Param(DEFAULTS.new_arrival_slots, type="integer", minimum=0, maximum=500,
                               title="Slots for new arrivals (0 = off)",
                               description="The last slots of each user's list go to this many active products with no "
                                           "interaction in the window, chosen by category, attributes and name."),
    "diversity_lambda": Param(DEFAULTS.diversity_lambda, type="number", minimum=0, maximum=1,
                              title="Diversity of user lists (MMR lambda, 0 = off)",
                              description="Trade score for variety: each next pick is penalised by its similarity to the ones before."),
    "ann_scoring": Param(DEFAULTS.ann_scoring, type="boolean", title="Approximate top-N for large catalogues",
                         description="Score each user's list against candidates from an HNSW index over the product "
                                     "factors (then ranked exactly), when at least ann_min_items products are allowed. "
                                     "Pays from about 1M products; recall@10 against exact about 0.99."),
    "ann_min_items": Param(DEFAULTS.ann_min_items, type="integer", minimum=1, title="Approximate top-N: smallest catalogue",
                           description="With ann_scoring on, smaller catalogues (products a list may hold) stay exact."),
    "k": Param(DEFAULTS.k, type="integer", minimum=1, maximum=500, title="K of MAP@K and friends",
               description="How many recommendations the evaluation scores per holdout user (MAP, nDCG, precision, "
                           "recall at K); the quality gate compares MAP@K."),
    "min_lift": Param(DEFAULTS.min_lift, type="number", minimum=0, title="Quality gate: required lift over popularity",
                      description="Publish only if model MAP@K > popularity MAP@K * (1 + min_lift)."),
    "max_map_drop": Param(DEFAULTS.max_map_drop, type="number", minimum=0, maximum=1,
                          title="Quality gate: largest allowed MAP@K drop vs the live model (fraction)",
                          description="Publish only if model MAP@K >= (1 - max_map_drop) x the live model's MAP@K; "
                                      "1 turns this check off."),
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
    result = matrix_stage(settings, planned(run, settings))
    log.info("matrix: %d users x %d products", result.n_users, result.n_items)
    return run


def is_scheduled(dag_run) -> bool:
    return dag_run.run_type == "scheduled"


def not_published_because(settings, run, dag_run) -> str | None:
    """Why this run will not publish, or None: the live version holds newer data (a backfill), or
    this is a scheduled run and a manual run published the same window."""
    from recsys.pipeline.stages import chosen_version_blocker, publish_blocker

    blocker = publish_blocker(settings, run)
    if blocker is None and is_scheduled(dag_run):
        blocker = chosen_version_blocker(settings, run)
    return blocker


@dag(
    dag_id="recsys_daily",
    schedule=CronDataIntervalTimetable(DAILY_SCHEDULE, timezone="UTC"),
    params=PARAMS,
    doc_md=DAILY_DOC,
    **DAG_SETTINGS,
)
def recsys_daily():
    @task(inlets=[TUNED_ASSET])
    def extract(params=None, data_interval_end=None, dag_run=None, inlet_events=None) -> dict:
        """Fix the run (effective params, window, folder) and extract its interactions."""
        from recsys.pipeline.stages import extract_stage, plan_run

        values = dict(params)
        steering = {name: values.pop(name) for name in RUN_PARAMS}
        settings = recsys_settings()
        end = window_end(data_interval_end, dag_run.run_after)
        run = plan_run(settings, end, PipelineParams.from_dict(values), steering["use_tuned_params"])
        tune_events = inlet_events[TUNED_ASSET]
        if tune_events:  # recorded with the run: which tune last reported, and what it decided
            log.info("last tune: %s", tune_events[-1].extra)
        blocker = not_published_because(settings, run, dag_run)
        if blocker:
            log.warning("this run will not publish: %s", blocker)
        result = extract_stage(settings, run)
        log.info("run %s: window %s .. %s, %d rows read, %d kept", run.paths.key, run.window.start.isoformat(),
                 run.window.end.isoformat(), result.rows_read, result.rows_kept)
        return {**run.to_dict(), "shards": steering["publish_shards"], "rows_read": result.rows_read,
                "rows_kept": result.rows_kept, "will_not_publish": blocker}

    @task
    def analyse_experiment(run: dict) -> dict | None:
        """Analyse the experiment running now and stop the variants its guardrails find significantly
        worse (recorded), before train snapshots it; alert on a stop or a sample-ratio mismatch
        without failing the run. No experiment running: nothing to do."""
        from recsys.pipeline.stages import analyse_experiment_stage

        settings = recsys_settings()
        analysis = analyse_experiment_stage(settings, planned(run, settings))
        if analysis is None:
            log.info("no experiment running")
            return None
        log.info("%s", analysis.summary)
        for text in analysis.alerts:
            log.warning("%s", text)
            send_alert(text)
        log.info("experiment analysis: %s", analysis.path)
        return analysis.to_dict()

    @task
    def train(run: dict) -> dict:
        """Train ALS twice on the run's matrices: before the holdout cutoff (what evaluate scores) and
        on the whole window (what publish serves)."""
        from recsys.pipeline.stages import train_stage

        settings = recsys_settings()
        planned_run = planned(run, settings)
        train_stage(settings, planned_run)
        log.info("trained %s: %d factors, %d iterations", planned_run.paths.key, planned_run.params.factors,
                 planned_run.params.iterations)
        return run

    @task
    def evaluate(run: dict, run_id=None) -> dict:
        """Holdout metrics for model and popularity, recorded in recsys_runs with the HTML report
        (this task's extra link "Evaluation report"); fails the run, in one log line, if the quality
        gate refuses."""
        from recsys.core.errors import QualityGateError
        from recsys.core.layout import EVALUATION_HTML
        from recsys.pipeline.stages import evaluate_stage, report_location

        settings = recsys_settings()
        planned_run = planned(run, settings)
        try:
            result = evaluate_stage(settings, planned_run, dag_run_id=run_id)
        except QualityGateError as refused:
            log.error("%s; the live version stays", refused)
            raise ExpectedFailure(refused) from None
        finally:  # a refused run's report matters most
            if (planned_run.paths.evaluation / EVALUATION_HTML).exists():
                log.info("evaluation report: %s (in the UI: this task's extra link 'Evaluation report')",
                         report_location(planned_run))
        log.info("quality gate %s", result.reason)
        return {**run, "model_map": result.model.map, "popularity_map": result.popularity.map,
                "report": report_location(planned_run)}

    @task(on_failure_callback=[*ALERTS, record_failed_publish])
    def prepare_publish(run: dict, dag_run=None) -> list[dict]:
        """Start a publish attempt: stage products' lists; one job per user shard. A run that will not
        publish is skipped here; the publish task says why."""
        from recsys.core.errors import StaleVersionError
        from recsys.pipeline.stages import chosen_version_blocker, prepare_publish_stage

        settings = recsys_settings()
        planned_run = planned(run, settings)
        if is_scheduled(dag_run) and (blocker := chosen_version_blocker(settings, planned_run)):
            raise AirflowSkipException(blocker)
        try:  # a run older than the live version is recorded as skipped_stale and skipped
            version, attempt = prepare_publish_stage(settings, planned_run, dag_run.run_id)
        except StaleVersionError as stale:
            raise AirflowSkipException(str(stale)) from stale
        log.info("publish attempt %s of version %s: %d shard(s)", attempt, version, run["shards"])
        return [{"run": run, "attempt": attempt, "shard": shard} for shard in range(run["shards"])]

    # doc_md given: a mapped task does not take its docstring as its docs
    @task(map_index_template="{{ shard_label }}", on_failure_callback=[*ALERTS, record_failed_publish],
          doc_md="Score this shard's users (one of ``publish_shards`` equal ranges of them) and write their lists "
                 "to the publish attempt's staging keys in Redis; shards run in parallel, on any worker.")
    def publish_shard(job: dict) -> dict:
        from dataclasses import asdict

        from recsys.pipeline.stages import publish_shard_stage

        run = job["run"]
        get_current_context()["shard_label"] = f"shard {job['shard'] + 1} of {run['shards']}"
        settings = recsys_settings()
        result = publish_shard_stage(settings, planned(run, settings), job["attempt"], job["shard"], run["shards"])
        log.info("shard %d of %d: %d users staged", job["shard"] + 1, run["shards"], result.users)
        return asdict(result)

    # none_failed: it runs when prepare_publish was skipped, to say in its own log why nothing was published
    @task(outlets=[LIVE_ASSET], trigger_rule="none_failed",
          on_failure_callback=[*ALERTS, record_failed_publish], on_skipped_callback=SKIP_ALERTS)
    def publish(run: dict, outlet_events=None, dag_run=None, ti=None) -> dict:
        """Check every shard (staging again what a Redis restart lost), then switch the new version
        live atomically; the live asset's event carries the version and its metrics. When the run
        does not publish, this task's log says why and it is skipped (no asset event)."""
        from recsys.core.errors import EmptyResultError, StaleVersionError
        from recsys.pipeline.publish.stage import ShardResult
        from recsys.pipeline.stages import finish_publish_stage

        settings = recsys_settings()
        planned_run = planned(run, settings)
        shards = run["shards"]
        jobs = ti.xcom_pull(task_ids="prepare_publish")
        if jobs is None:  # prepare_publish was skipped
            reason = not_published_because(settings, planned_run, dag_run) or "prepare_publish was skipped"
            log.warning("not published: %s", reason)
            raise AirflowSkipException(reason)
        # one pull per shard: a shard marked success by hand (or whose result is gone) has none
        pulled = [ti.xcom_pull(task_ids="publish_shard", map_indexes=shard) for shard in range(shards)]
        missing = [shard + 1 for shard, result in enumerate(pulled) if result is None]
        if missing:
            error = EmptyResultError(
                f"shard(s) {missing} of {shards} left no result (marked success by hand?): nothing was switched; "
                "clear publish_shard of this run (with its downstream) to stage them"
            )
            log.error("%s", error)
            raise ExpectedFailure(error)
        results = [ShardResult(**result) for result in pulled]
        try:
            result = finish_publish_stage(settings, planned_run, jobs[0]["attempt"], results, shards, dag_run.run_id)
        except StaleVersionError as stale:
            log.warning("not published: %s", stale)
            raise AirflowSkipException(str(stale)) from stale
        outlet_events[LIVE_ASSET].extra = {
            "version": result.version, "window": run["window"], "run_key": planned_run.paths.key,
            "metrics": {"model_map": run["model_map"], "popularity_map": run["popularity_map"]}, "users": result.users,
        }
        log.info("version %s is live: %d users", result.version, result.users)
        return {"version": result.version, "users": result.users}

    extracted = extract()
    trained = train(build_matrix(extracted))
    # before train: a variant stopped today is served the control by today's publish
    analyse_experiment(extracted) >> trained
    evaluated = evaluate(trained)
    # the task's own links, computed by the worker when it ends (kept in XCom, shown by the UI)
    evaluated.operator.operator_extra_links = (EvaluationReportLink(),)
    publish_shard.expand(job=prepare_publish(evaluated)) >> publish(evaluated)


recsys_daily()


@dag(
    dag_id="recsys_tune",
    schedule=None,  # triggered only: see TUNE_DOC ("When it runs")
    params={
        "n_trials": Param(40, type="integer", minimum=1, maximum=1000, title="Trials (the search budget)",
                          description="ALS fits the search may make (about 1-2 s each on the demo shop); the search "
                                      "starts from the active tuned params."),
        "lookback_days": Param(DEFAULTS.lookback_days, type="integer", minimum=2, title="Lookback (days)",
                               description="Tune on interactions of this many days before the trigger time."),
        "holdout_days": Param(DEFAULTS.holdout_days, type="integer", minimum=1, title="Validation (last days)",
                              description="The last days of the window validate each trial (MAP@K, the daily "
                                          "quality gate's metric)."),
        "models": Param(list(DEFAULTS.models), type="array", items={"enum": list(MODEL_FAMILIES)}, minItems=1,
                        title="Model families to tune",
                        description="Set it to the daily run's models. ALS is always tuned (it chooses the "
                                    "confidence scaling every family fits on), then each other family on that "
                                    "scaling, n_trials each; a blend's weight is chosen in every daily run."),
        "repeats": Param(TUNE_REPEATS, type="integer", minimum=1, maximum=20, title="Fits per trial (seeds)",
                         description="Each trial is the mean MAP@K of this many fits with seeds 42, 43, ... "
                                     "(EASE and item-kNN have no seed: one fit); the sd is kept with it."),
    },
    doc_md=TUNE_DOC,
    **DAG_SETTINGS,
)
def recsys_tune():
    @task
    def extract(params=None, data_interval_end=None, dag_run=None) -> dict:
        """Fix the tune's window (ending when it was triggered) and extract its interactions."""
        from recsys.pipeline.stages import extract_stage, plan_run

        # an unscheduled DAG's manual run may have no data interval: its window ends when it was triggered
        end = data_interval_end or dag_run.run_after
        # raw weights: the search itself chooses the confidence scaling
        search_params = PipelineParams(
            lookback_days=params["lookback_days"], holdout_days=params["holdout_days"], confidence_scaling="none"
        )
        settings = recsys_settings()
        run = plan_run(settings, end, search_params, use_tuned=False)
        result = extract_stage(settings, run)
        log.info("tune window %s .. %s: %d rows kept", run.window.start.isoformat(), run.window.end.isoformat(),
                 result.rows_kept)
        return run.to_dict()

    @task(execution_timeout=timedelta(hours=6), outlets=[TUNED_ASSET])
    def tune(run: dict, params=None, outlet_events=None) -> dict:
        """Search the params of ALS and the other ``models`` on the window (``n_trials`` trials
        each), keep the result and make it active only if no family regresses; the tuned asset's
        event says what was decided."""
        from recsys.pipeline.stages import tune_stage

        settings = recsys_settings()
        tuned = tune_stage(settings, planned(run, settings), params["n_trials"], tuple(params["models"]),
                           params["repeats"])
        outlet_events[TUNED_ASSET].extra = {"result_id": tuned.result_id, "map": tuned.measured(),
                                            "decision": tuned.decision}
        log.info("tune result %s: MAP %s, %s", tuned.result_id, tuned.measured(), tuned.decision)
        return {"result_id": tuned.result_id, "params": tuned.params, "family_params": tuned.family_params(),
                "map": tuned.measured(), "decision": tuned.decision}

    tune(build_matrix(extract()))


recsys_tune()
