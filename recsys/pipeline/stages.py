"""A run: its effective params, data window and artifact folders, and the whole pipeline in one
process (the same stage functions the DAG calls, in order).

Every run works in a folder named by its data window end and params fingerprint, so a rerun of
the same run overwrites its own artifacts instead of piling up duplicates. Two processes working on
the same run folder on one machine take turns (:func:`run_lock`): a whole ``run`` holds it from
extract to publish, each stage holds it while it writes. With a shared artifact
store (``RECSYS_ARTIFACTS_URL``) each stage pulls its input folders from the store into the local
artifacts folder, runs on local files, and pushes its output folder back, so the next stage can
run on another machine.

Each stage imports its own modules when it runs: an Airflow task (a fresh process) running one
stage does not load the others' libraries (numba, matplotlib, Redis...), which were most of a
stage process's memory before it read anything.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from recsys.core import artifacts
from recsys.core.artifacts import ArtifactStore
from recsys.core.errors import FutureWindowError, RecsysError, StaleVersionError
from recsys.core.layout import (
    EVALUATION,
    EVALUATION_HTML,
    EVALUATION_REPORT,
    EXPERIMENT,
    EXPERIMENT_ANALYSIS,
    EXTRACT,
    EXTRACT_REPORT,
    INTERACTIONS,
    MANIFEST,
    MATRIX,
    MODEL,
    OLDER_NEGATIVES,
    PRODUCTS,
    PUBLISHED,
    PUBLISHED_MARKER,
    RUNS,
    TUNED,
    RunPaths,
    configured_store,
    pull_folders,
    run_paths,
    window_end_of,
)
from recsys.core.params import TUNE_REPEATS, PipelineParams
from recsys.core.settings import Settings
from recsys.core.window import Window, stamp, version_name, window_ending
from recsys.pipeline import history
from recsys.pipeline.tune import TunedParams, keep_result, load_tuned, tuned_path, with_tuned

if TYPE_CHECKING:
    from recsys.pipeline.evaluate import EvaluationResult
    from recsys.pipeline.extract import ExtractResult
    from recsys.pipeline.matrix import MatrixResult
    from recsys.pipeline.publish.stage import PhaseTimings, PublishResult, ShardResult
    from recsys.pipeline.train import TrainResult

log = logging.getLogger(__name__)


def refuse_future_window(settings: Settings, end: datetime) -> None:
    """A window may not end after now (plus clock skew): its version would hold every normal run
    after it back as stale."""
    now = datetime.now(UTC)
    if end > now + timedelta(seconds=settings.max_clock_skew_seconds):
        raise FutureWindowError(
            f"the data window would end at {end.isoformat()}, after now ({now.isoformat(timespec='seconds')}) "
            f"plus the allowed clock skew of {settings.max_clock_skew_seconds:g} s; give --end a past time "
            "(or leave it out for now)"
        )


_held_run_locks = threading.local()  # .depth: lock file -> nesting depth in this thread


@contextmanager
def run_lock(paths: RunPaths, wait_seconds: float, shared: bool = False) -> Iterator[None]:
    """Hold the run folder's lock on this machine (flock on ``<run folder>.lock``): exclusive to
    write a stage's folder, ``shared`` to only read (publish steps, several shards at once).
    Re-entrant within a thread, so a whole run can hold it around its stages."""
    path = paths.lock
    held = _held_run_locks.__dict__.setdefault("depth", {})
    if path in held:
        held[path] += 1
        try:
            yield
        finally:
            held[path] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline, announced = time.monotonic() + wait_seconds, False
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RunBusyError(
                        f"another process is working on run {paths.key} (lock {path}); gave up after "
                        f"{wait_seconds:g} s. Run it again when that one has finished."
                    ) from None
                if not announced:
                    log.warning("another process is working on run %s; waiting for it", paths.key)
                    announced = True
                time.sleep(0.2)
        held[path] = 1
        try:
            yield
        finally:
            del held[path]
    finally:
        os.close(fd)  # closing the descriptor releases the flock


class RunBusyError(RecsysError):
    """Another process kept the run folder locked for longer than the wait allowed."""


@dataclass(frozen=True)
class Run:
    """Everything a stage needs to know about its run; :meth:`to_dict` is small enough for an
    Airflow XCom and leaves out what each worker takes from its own settings (folders, store)."""

    params: PipelineParams
    window: Window
    paths: RunPaths
    store: ArtifactStore | None  # None: artifacts stay in the local folder only

    def to_dict(self) -> dict:
        return {"params": self.params.to_dict(), "window": self.window.to_dict()}

    @classmethod
    def from_dict(cls, values: dict, settings: Settings) -> Run:
        """The run a previous task planned, with this worker's artifacts folder and store."""
        params, window = PipelineParams.from_dict(values["params"]), Window.from_dict(values["window"])
        return cls(params, window, run_paths(settings, window, params), configured_store(settings))

    def pull(self, *folders: str) -> None:
        """Bring the run's input folders from the store into the local artifacts folder."""
        if self.store is not None:
            pull_folders(self.store, self.paths, folders)

    def push(self, folder: str) -> None:
        """Upload a folder a stage has finished writing, for the stages after it."""
        if self.store is not None:
            artifacts.push(self.store, self.paths.root / folder, f"{self.paths.key}/{folder}")


def plan_run(settings: Settings, end: datetime, params: PipelineParams, use_tuned: bool = True) -> Run:
    """Fix a run's effective params once (tuned values for fields left at their defaults)."""
    refuse_future_window(settings, end)
    run_store = configured_store(settings)
    effective = with_tuned(params, tuned_params(settings, run_store)) if use_tuned else params
    window = window_ending(end, effective)
    return Run(effective, window, run_paths(settings, window, effective), run_store)


def tuned_params(settings: Settings, run_store: ArtifactStore | None) -> TunedParams | None:
    """The tuned params; with a store, only its copy counts, so every worker plans the same run."""
    if run_store is not None and not pull_tuned(settings, run_store):
        return None
    return load_tuned(settings)


def pull_tuned(settings: Settings, run_store: ArtifactStore) -> bool:
    """Mirror the store's tuned params folder locally; False if the store has none yet."""
    if artifacts.pushed(run_store, TUNED) is None:
        return False
    artifacts.pull(run_store, TUNED, tuned_path(settings).parent)
    return True


@dataclass(frozen=True)
class PipelineResult:
    run: Run
    extract: ExtractResult
    matrix: MatrixResult
    experiment: ExperimentAnalysis | None
    train: TrainResult
    evaluation: EvaluationResult
    publish: PublishResult


def live_metrics(settings: Settings) -> dict | None:
    from recsys import storage
    from recsys.storage import reads

    return reads.live_metrics(*storage.connect(settings))


# One function per stage, taking the planned run: the DAG's tasks, the CLI's stage commands and
# run_pipeline all call these, so they cannot drift apart. Each pulls the folders it reads and
# pushes the one it writes (no-ops without a store).


@contextmanager
def _one_blas_thread() -> Iterator[None]:
    """BLAS held to one thread while implicit scores with its own threads (evaluate, publish): a
    multi-threaded BLAS under it oversubscribes the cores, and implicit warns about it."""
    # threadpoolctl limits the BLAS libraries loaded when the limit is set: load scipy's own OpenBLAS
    # (numpy's is loaded already) first, or a fresh process (each Airflow task) imports it under the
    # limit with all its threads
    import scipy.linalg  # noqa: F401
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _writing(settings: Settings, run: Run):
    return run_lock(run.paths, settings.run_lock_wait_seconds)


def _reading(settings: Settings, run: Run):
    return run_lock(run.paths, settings.run_lock_wait_seconds, shared=True)


def extract_stage(settings: Settings, run: Run, progress: bool = False) -> ExtractResult:
    from recsys import storage
    from recsys.pipeline.extract import extract
    from recsys.storage import reads

    with _writing(settings, run):
        live_id_types = reads.live_id_types(*storage.connect(settings))
        result = extract(settings, run.window, run.paths.extract, run.params, progress, live_id_types)
        run.push(EXTRACT)
    return result


def matrix_stage(settings: Settings, run: Run) -> MatrixResult:
    from recsys.pipeline.extract import extracted_id_types
    from recsys.pipeline.matrix import build_matrix

    with _writing(settings, run):
        run.pull(EXTRACT)
        extracted = run.paths.extract
        result = build_matrix(
            extracted / INTERACTIONS, extracted / PRODUCTS, run.window, run.paths.matrix,
            run.params, extracted_id_types(extracted), extracted / OLDER_NEGATIVES,
        )
        run.push(MATRIX)
    return result


@dataclass(frozen=True)
class ExperimentAnalysis:
    """What the analysis of the running experiment found, small enough for an XCom: the whole
    report is the run's ``experiment/analysis.json`` (``path``)."""

    experiment: str
    path: str
    summary: str  # one line
    stopped_now: list[str]  # variants a guardrail stopped in this analysis
    alerts: list[str]  # a line each: a stop, a sample-ratio alarm

    def to_dict(self) -> dict:
        return asdict(self)


def analyse_experiment_stage(settings: Settings, run: Run, now: datetime | None = None) -> ExperimentAnalysis | None:
    """Analyse the experiment running now and act on its guardrails (before train, which
    snapshots the experiment: a variant stopped here is served the control by this run's
    publish). The report goes to the run's ``experiment/analysis.json``, for the evaluation
    report. None, after clearing an earlier attempt's analysis, when no experiment runs."""
    from recsys.pipeline import experiments

    result = experiments.report_running(settings, now)
    folder = run.paths.experiment
    with _writing(settings, run):
        if result is None:
            if folder.exists() or (run.store is not None and artifacts.pushed(run.store, f"{run.paths.key}/{EXPERIMENT}")):
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                run.push(EXPERIMENT)  # empty: the report of a rerun shows no stale analysis
            return None
        folder.mkdir(parents=True, exist_ok=True)
        (folder / EXPERIMENT_ANALYSIS).write_text(json.dumps(result, indent=1))
        run.push(EXPERIMENT)
    return ExperimentAnalysis(
        experiment=result["experiment"], path=experiment_analysis_location(run),
        summary=experiments.summary_line(result), stopped_now=result["stopped_now"], alerts=experiments.alerts(result),
    )


def experiment_analysis_location(run: Run) -> str:
    if run.store is not None and (upload := artifacts.pushed(run.store, f"{run.paths.key}/{EXPERIMENT}")):
        return run.store.url(run.paths.key, EXPERIMENT, upload.upload_id, EXPERIMENT_ANALYSIS)
    return (run.paths.experiment / EXPERIMENT_ANALYSIS).resolve().as_uri()


def _experiment_analysis(run: Run) -> dict | None:
    """The run's analysis of its experiment, if one was running (pulled from the store if there)."""
    if run.store is not None and artifacts.pushed(run.store, f"{run.paths.key}/{EXPERIMENT}"):
        run.pull(EXPERIMENT)
    path = run.paths.experiment / EXPERIMENT_ANALYSIS
    return json.loads(path.read_text()) if path.exists() else None


def train_stage(settings: Settings, run: Run, progress: bool = False) -> TrainResult:
    """Train the run's model, and the models of the running experiment's variants that need
    their own: the experiment running now is the one this run's publish serves."""
    from recsys.core.experiments import running_experiment
    from recsys.pipeline.train import train

    with _writing(settings, run):
        run.pull(MATRIX)
        experiment = running_experiment(settings, datetime.now(UTC))
        result = train(run.paths.matrix, run.paths.model, run.params, progress=progress, experiment=experiment)
        run.push(MODEL)
    return result


# how many runs of the quality history the evaluation report plots
REPORT_HISTORY_RUNS = 30


def evaluate_stage(settings: Settings, run: Run, dag_run_id: str | None = None) -> EvaluationResult:
    """Evaluate, record the run in the quality history, write the HTML report, then apply the
    quality gate (raises QualityGateError when it refuses: after recording, so refusals show)."""
    from recsys.pipeline import report
    from recsys.pipeline.evaluate import enforce_quality_gate, evaluate
    from recsys.pipeline.train import checked_model_build

    with _writing(settings, run), _one_blas_thread():
        run.pull(MATRIX, MODEL)
        paths = run.paths
        checked_model_build(paths.matrix, paths.model)
        result = evaluate(paths.matrix, paths.model, paths.evaluation, run.params, live_metrics(settings))
        extract_counts = _extract_counts(run)
        history.record_evaluation(settings, _run_record(run, result, extract_counts, dag_run_id))
        evaluation = json.loads(result.report_path.read_text())
        recent = history.recent_runs(settings, REPORT_HISTORY_RUNS)[::-1]
        page = report.render(evaluation, recent, paths.key, extract_counts, _experiment_analysis(run))
        (paths.evaluation / EVALUATION_HTML).write_text(page)
        run.push(EVALUATION)  # a refused report too: it says why
    enforce_quality_gate(result)
    return result


def report_location(run: Run) -> str:
    """Where the run's HTML evaluation report is: its file in the store's current upload of the
    eval folder, else the local file."""
    if run.store is not None and (upload := artifacts.pushed(run.store, f"{run.paths.key}/{EVALUATION}")):
        return run.store.url(run.paths.key, EVALUATION, upload.upload_id, EVALUATION_HTML)
    return (run.paths.evaluation / EVALUATION_HTML).resolve().as_uri()


def publish_blocker(settings: Settings, run: Run) -> str | None:
    """Why this run's publish will be skipped (the live version holds fresher data), or None.
    A backfill says so at its start: it still evaluates, for the quality history."""
    from recsys import storage
    from recsys.storage import builds, reads

    client, keys = storage.connect(settings)
    live_end = builds.live_data_end(client, keys)  # the same test publish applies before its work
    if live_end is None or live_end <= run.window.end.timestamp():
        return None
    return (
        f"the live version {reads.live_version(client, keys)} holds data up to "
        f"{datetime.fromtimestamp(live_end, UTC).isoformat()}, after this run's window end "
        f"{run.window.end.isoformat()}: this run evaluates (for the quality history) but will not publish"
    )


def _extract_counts(run: Run) -> dict | None:
    """Rows read / kept / dropped by reason, from the run's extract report (local, else the
    store's copy read alone: the extract's Parquet files stay where they are)."""
    local = run.paths.extract / EXTRACT_REPORT
    if local.exists():
        text = local.read_text()
    elif run.store is not None and (upload := artifacts.pushed(run.store, f"{run.paths.key}/{EXTRACT}")):
        text = run.store.fs.cat_file(run.store.path(run.paths.key, EXTRACT, upload.upload_id, EXTRACT_REPORT))
    else:
        return None
    values = json.loads(text)["interactions"]
    return {name: values[name] for name in ("rows_read", "rows_kept", "rows_dropped", "rows_invalid", "dropped")}


def _candidates(result: EvaluationResult) -> dict:
    """The chosen family and every family's validation metrics, for the quality history."""
    evaluation = json.loads(result.report_path.read_text())
    chosen = evaluation.get("selection") or {}
    return {
        "family": (evaluation.get("model_family") or {}).get("family", "als"),
        "candidates": {name: row["validation"] for name, row in chosen.get("families", {}).items()},
    }


def _run_record(
    run: Run, result: EvaluationResult, extract_counts: dict | None, dag_run_id: str | None
) -> history.RunRecord:
    model = json.loads((run.paths.model / MANIFEST).read_text())
    counts = model["counts"]
    return history.RunRecord(
        run_key=run.paths.key,
        dag_run_id=dag_run_id,
        window_start=run.window.start,
        window_end=run.window.end,
        params=run.params.to_dict(),
        metrics={"model": result.model.to_dict(), "popularity": result.popularity.to_dict(), **_candidates(result)},
        gate_passed=result.passed,
        gate_reason=result.reason,
        extract_counts=extract_counts,
        train_seconds=model.get("seconds"),
        interactions=counts.get("interactions"),
        users=counts.get("users"),
        items=counts.get("items"),
    )


@contextmanager
def _recording_stale(settings: Settings, run: Run, dag_run_id: str | None) -> Iterator[None]:
    """A publish refused as stale is recorded as skipped_stale before the error goes on."""
    try:
        yield
    except StaleVersionError:
        history.record_publish(settings, run.paths.key, history.SKIPPED_STALE, dag_run_id=dag_run_id)
        raise


def _mark_published(
    settings: Settings, run: Run, result: PublishResult, dag_run_id: str | None, published_at: str | None = None
) -> None:
    """Record that the run went live: in its artifacts (`recsys republish` finds it there) and in
    the quality history (the row of the DAG run that published it)."""
    folder = run.paths.root / PUBLISHED
    folder.mkdir(parents=True, exist_ok=True)
    published_at = published_at or datetime.now(UTC).isoformat()
    marker = {"version": result.version, "published_at": published_at, "window": run.window.to_dict()}
    (folder / PUBLISHED_MARKER).write_text(json.dumps(marker, indent=2))
    run.push(PUBLISHED)
    history.record_publish(settings, run.paths.key, history.PUBLISHED, result.version, dag_run_id)


def publish_stage(
    settings: Settings, run: Run, progress: bool = False, timings: PhaseTimings | None = None,
    dag_run_id: str | None = None,
) -> PublishResult:
    """The whole publish as one attempt, in this process (``timings``: seconds per phase, if given)."""
    from recsys.pipeline.publish.stage import publish

    with _reading(settings, run), _one_blas_thread():
        run.pull(MATRIX, MODEL, EVALUATION)
        paths = run.paths
        with _recording_stale(settings, run, dag_run_id):
            result = publish(
                settings, paths.matrix, paths.model, paths.evaluation / EVALUATION_REPORT, run.params,
                progress=progress, artifacts_key=paths.key if run.store else None, timings=timings,
            )
        _mark_published(settings, run, result, dag_run_id)
    return result


def prepare_publish_stage(settings: Settings, run: Run, dag_run_id: str | None = None) -> tuple[str, str]:
    """Start a publish attempt (the DAG's first publish task); returns (version, attempt)."""
    from recsys.pipeline.publish.stage import new_attempt, prepare_publish

    attempt = new_attempt()
    with _reading(settings, run), _recording_stale(settings, run, dag_run_id), _one_blas_thread():
        run.pull(MATRIX, MODEL)
        return prepare_publish(settings, run.paths.matrix, run.paths.model, run.params, attempt), attempt


def publish_shard_stage(settings: Settings, run: Run, attempt: str, shard: int, shards: int) -> ShardResult:
    from recsys.pipeline.publish.stage import publish_shard

    with _reading(settings, run), _one_blas_thread():
        run.pull(MATRIX, MODEL)
        return publish_shard(settings, run.paths.matrix, run.paths.model, run.params, attempt, shard, shards)


def finish_publish_stage(
    settings: Settings, run: Run, attempt: str, results: list[ShardResult], shards: int,
    dag_run_id: str | None = None,
) -> PublishResult:
    from recsys.pipeline.publish.stage import finish_publish

    switched = switched_by(settings, attempt)
    if switched is not None:
        # an earlier try of this task switched the version and was stopped before it could say so
        log.info("version %s is live already: this publish attempt (%s) switched it at %s; recording it",
                 switched.version, attempt, switched.published_at)
        _mark_published(settings, run, switched.result, dag_run_id)
        return switched.result
    with _reading(settings, run), _one_blas_thread():
        run.pull(MATRIX, MODEL, EVALUATION)
        paths = run.paths
        with _recording_stale(settings, run, dag_run_id):
            result = finish_publish(
                settings, paths.matrix, paths.model, paths.evaluation / EVALUATION_REPORT, run.params, attempt,
                results, shards, artifacts_key=paths.key if run.store else None,
            )
        _mark_published(settings, run, result, dag_run_id)
    return result


def record_failed_publish(settings: Settings, run: Run, attempt: str | None, dag_run_id: str | None) -> Switched | None:
    """A publish task failed after evaluate recorded the run: it is recorded as failed, unless
    publish attempt ``attempt`` switched its version live before the task was stopped (marked
    failed by hand, killed): then it is recorded as published, as Redis says, in the history and
    in the run's artifacts (so `recsys republish` finds it). Returns that switch, if any."""
    switched = switched_by(settings, attempt) if attempt else None
    if switched is None:
        history.record_publish(settings, run.paths.key, history.FAILED, dag_run_id=dag_run_id)
        return None
    _mark_published(settings, run, switched.result, dag_run_id, published_at=switched.published_at)
    return switched


@dataclass(frozen=True)
class Switched:
    """A live version as the publish attempt that switched it left it."""

    version: str
    published_at: str
    result: PublishResult


def switched_by(settings: Settings, attempt: str) -> Switched | None:
    """The live version if publish attempt ``attempt`` switched it (its meta names the attempt)."""
    from recsys import storage
    from recsys.pipeline.publish.stage import PublishResult
    from recsys.storage import reads

    meta = reads.live_meta(*storage.connect(settings))
    if meta is None or meta.get("attempt") != attempt:
        return None
    return Switched(meta["version"], meta["published_at"], PublishResult.from_counts(meta["version"], meta["counts"]))


# the prefix Airflow's scheduler gives the run ids of the runs it creates on the schedule
SCHEDULED_RUN_PREFIX = "scheduled__"


def chosen_version_blocker(settings: Settings, run: Run) -> str | None:
    """Why a scheduled run of this window must not publish, or None: the live version holds the
    same data window and was published by a run someone chose (a manual trigger with its params, a
    backfill, `recsys run`), not by a scheduled run. A scheduled run with default params that
    finishes after a manual one would otherwise replace the manual choice."""
    from recsys import storage
    from recsys.storage import reads

    meta = reads.live_meta(*storage.connect(settings))
    if meta is None or meta["version"] == version_name(run.window, run.params):
        return None
    if datetime.fromisoformat(meta["data_end"]) != run.window.end:
        return None  # older data: the stale check refuses it; newer: a new day replaces any choice
    publisher = history.publisher_of(settings, meta["version"])
    if publisher is None or (publisher.dag_run_id or "").startswith(SCHEDULED_RUN_PREFIX):
        return None
    chosen_by = f"run {publisher.dag_run_id}" if publisher.dag_run_id else "a run outside Airflow (recsys run/publish)"
    return (
        f"the live version {meta['version']} holds this window's data (up to {run.window.end.isoformat()}) with "
        f"params chosen by {chosen_by}: a scheduled run of the same window does not replace it. This run "
        "evaluates (for the quality history) but will not publish; trigger it by hand to publish its params"
    )


def tune_stage(
    settings: Settings, run: Run, n_trials: int, families: tuple[str, ...] = ("als",), repeats: int = TUNE_REPEATS
) -> TunedParams:
    """Tune ``families`` (ALS always) on the run's matrix, starting from the active tuned params;
    keep the result and make it active only if it does not regress (``tune.promotion``).
    Concurrent tunes, on any worker, take turns for the keep-and-activate step under one Redis lock."""
    from recsys.pipeline.tune import tune_on_matrix

    with _reading(settings, run):
        run.pull(MATRIX)
        active = tuned_params(settings, run.store)
        tuned = tune_on_matrix(run.paths.matrix, run.params, n_trials, start_from=active, families=families,
                               repeats=repeats)
    with tune_lock(settings):
        if run.store is not None:
            pull_tuned(settings, run.store)  # the results so far: the push below replaces the folder
        tuned = keep_result(settings, tuned)
        if run.store is not None:
            artifacts.push(run.store, tuned_path(settings).parent, TUNED)
    return tuned


# the keep-and-activate step is short; a holder that died frees the lock after this long
TUNE_LOCK_SECONDS = 300


@contextmanager
def tune_lock(settings: Settings) -> Iterator[None]:
    """One tune at a time reads the active params and replaces them (a Redis lock: shared by
    every worker, unlike a file lock)."""
    from recsys import storage
    from recsys.storage import locks

    with locks.tune_lock(*storage.connect(settings), TUNE_LOCK_SECONDS, settings.run_lock_wait_seconds) as taken:
        if not taken:
            raise RunBusyError(f"another tune kept the tune lock for over {settings.run_lock_wait_seconds:g} s")
        yield


def run_pipeline(
    settings: Settings, end: datetime, params: PipelineParams, use_tuned: bool = True, progress: bool = False
) -> PipelineResult:
    run = plan_run(settings, end, params, use_tuned)
    # one lock around the whole run: another run of the same window waits instead of interleaving
    with _writing(settings, run):
        return PipelineResult(
            run=run,
            extract=extract_stage(settings, run, progress),
            matrix=matrix_stage(settings, run),
            experiment=analyse_experiment_stage(settings, run),
            train=train_stage(settings, run, progress),
            evaluation=evaluate_stage(settings, run),
            publish=publish_stage(settings, run, progress),
        )


# --- the way back after a Redis loss: publish a finished run again, without retraining -------------


def _run_of(settings: Settings, key: str, run_store: ArtifactStore | None) -> Run:
    """The run whose folder is ``key`` (``runs/<end>/<fingerprint>``), from its matrix manifest."""
    paths = RunPaths(settings.artifacts_dir, key)
    if run_store is not None:
        pull_folders(run_store, paths, (MATRIX,))
    manifest = json.loads((paths.matrix / MANIFEST).read_text())
    params, window = PipelineParams.from_dict(manifest["params"]), Window.from_dict(manifest["window"])
    return Run(params, window, paths, run_store)


def _published_markers(settings: Settings, run_store: ArtifactStore | None) -> dict[str, dict]:
    """Run folder key -> its published.json, for every run that went live."""
    if run_store is None:
        found = settings.artifacts_dir.glob(f"{RUNS}/*/*/{PUBLISHED}/{PUBLISHED_MARKER}")
        return {path.parent.parent.relative_to(settings.artifacts_dir).as_posix(): json.loads(path.read_text())
                for path in found}
    markers = {}
    for marker in run_store.fs.glob(run_store.path(RUNS, "*", "*", PUBLISHED, artifacts.MARKER)):
        key = "/".join(marker.split("/")[-5:-2])
        upload = artifacts.pushed(run_store, f"{key}/{PUBLISHED}")
        if upload is not None:
            text = run_store.fs.cat_file(run_store.path(key, PUBLISHED, upload.upload_id, PUBLISHED_MARKER))
            markers[key] = json.loads(text)
    return markers


def published_run(settings: Settings, end: datetime | None = None) -> Run:
    """The run that went live last (with ``end``: last among those of that window end)."""
    run_store = configured_store(settings)
    markers = _published_markers(settings, run_store)
    if end is not None:
        markers = {key: marker for key, marker in markers.items() if window_end_of(key) == stamp(end)}
    if not markers:
        where = settings.artifacts_dir if run_store is None else run_store.url(RUNS)
        window = "" if end is None else f" with a window ending {end.isoformat()}"
        raise RecsysError(f"no published run{window} in {where}; `recsys run` makes one")
    key = max(markers, key=lambda k: (window_end_of(k), markers[k]["published_at"]))
    return _run_of(settings, key, run_store)


def republish(settings: Settings, end: datetime | None = None, progress: bool = False) -> PublishResult:
    """Publish a run that went live before again, from its artifacts (no extract, no training)."""
    return publish_stage(settings, published_run(settings, end), progress)


def recovery_hint(settings: Settings) -> str | None:
    """When nothing is live: what an operator can put back, and how. None if a version is live."""
    from recsys import storage
    from recsys.storage import builds, versions

    client, keys = storage.connect(settings)
    if builds.pointer(client, keys) is not None:
        return None
    kept = [info.version for info in versions.versions(client, keys)]
    if kept:
        return f"nothing is live, but kept versions exist ({', '.join(kept)}): `recsys rollback` makes one live again"
    try:
        run = published_run(settings)
    except (RecsysError, OSError):
        return None
    return f"nothing is live, but run {run.paths.key} was published before: `recsys republish` puts it back"
