"""A run: its effective params, data window and artifact folders, and the whole pipeline in one
process (the same stage functions the DAG calls, in order).

Every run works in a folder named by its data window end and params fingerprint, so a rerun of
the same run overwrites its own artifacts instead of piling up duplicates. With a shared artifact
store (``RECSYS_ARTIFACTS_URL``) each stage pulls its input folders from the store into the local
artifacts folder, runs on local files, and pushes its output folder back, so the next stage can
run on another machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from recsys import artifacts, store
from recsys.artifacts import ArtifactStore
from recsys.evaluate import EvaluationResult, enforce_quality_gate, evaluate
from recsys.extract import ExtractResult, Window, extract
from recsys.matrix import MatrixResult, build_matrix
from recsys.params import PipelineParams
from recsys.publish import (
    PublishResult,
    ShardResult,
    finish_publish,
    prepare_publish,
    publish,
    publish_shard,
)
from recsys.settings import Settings
from recsys.train import TrainResult, train
from recsys.tune import (
    TunedParams,
    load_tuned,
    save_tuned,
    tune_on_matrix,
    tuned_path,
    with_tuned,
)

# The stages' folders inside a run folder; the same names locally and in the store.
EXTRACT, MATRIX, MODEL, EVALUATION = "extract", "matrix", "model", "eval"
TUNED = "tuned"  # the store's copy of tune.tuned_path's folder


def window_ending(end: datetime, params: PipelineParams) -> Window:
    # a plain datetime in UTC: Airflow hands over pendulum objects, whose arithmetic can drop tzinfo
    end = datetime.fromtimestamp(end.timestamp(), tz=UTC)
    return Window(start=end - timedelta(days=params.lookback_days), end=end)


@dataclass(frozen=True)
class RunPaths:
    artifacts_dir: Path  # this worker's local artifacts folder
    key: str  # the run's folder relative to it, and to the store: runs/<window end>/<fingerprint>

    @property
    def root(self) -> Path:
        return self.artifacts_dir / self.key

    @property
    def extract(self) -> Path:
        return self.root / EXTRACT

    @property
    def matrix(self) -> Path:
        return self.root / MATRIX

    @property
    def model(self) -> Path:
        return self.root / MODEL

    @property
    def evaluation(self) -> Path:
        return self.root / EVALUATION


def run_paths(settings: Settings, window: Window, params: PipelineParams) -> RunPaths:
    return RunPaths(settings.artifacts_dir, f"runs/{window.end:%Y%m%dT%H%M%SZ}/{params.fingerprint()}")


def _pull_folders(run_store: ArtifactStore, paths: RunPaths, folders: tuple[str, ...]) -> None:
    for folder in folders:
        artifacts.pull(run_store, f"{paths.key}/{folder}", paths.root / folder)


def artifact_store(settings: Settings) -> ArtifactStore | None:
    """The shared store, or None when artifacts stay in the local folder only."""
    if not settings.artifacts_url:
        return None
    return artifacts.open_store(settings.artifacts_url, settings.artifacts_storage_options)


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
        return cls(params, window, run_paths(settings, window, params), artifact_store(settings))

    def pull(self, *folders: str) -> None:
        """Bring the run's input folders from the store into the local artifacts folder."""
        if self.store is not None:
            _pull_folders(self.store, self.paths, folders)

    def push(self, folder: str) -> None:
        """Upload a folder a stage has finished writing, for the stages after it."""
        if self.store is not None:
            artifacts.push(self.store, self.paths.root / folder, f"{self.paths.key}/{folder}")


def plan_run(settings: Settings, end: datetime, params: PipelineParams, use_tuned: bool = True) -> Run:
    """Fix a run's effective params once (tuned values for fields left at their defaults)."""
    run_store = artifact_store(settings)
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
    train: TrainResult
    evaluation: EvaluationResult
    publish: PublishResult


def live_metrics(settings: Settings) -> dict | None:
    return store.live_metrics(store.redis_client(settings), store.layout(settings))


# One function per stage, taking the planned run: the DAG's tasks, the CLI's stage commands and
# run_pipeline all call these, so they cannot drift apart. Each pulls the folders it reads and
# pushes the one it writes (no-ops without a store).


def extract_stage(settings: Settings, run: Run, progress: bool = False) -> ExtractResult:
    result = extract(settings, run.window, run.paths.extract, run.params, progress=progress)
    run.push(EXTRACT)
    return result


def matrix_stage(run: Run) -> MatrixResult:
    run.pull(EXTRACT)
    extracted = run.paths.extract
    result = build_matrix(
        extracted / "interactions.parquet", extracted / "products.parquet", run.window, run.paths.matrix, run.params
    )
    run.push(MATRIX)
    return result


def train_stage(run: Run, progress: bool = False) -> TrainResult:
    run.pull(MATRIX)
    result = train(run.paths.matrix, run.paths.model, run.params, progress=progress)
    run.push(MODEL)
    return result


def evaluate_stage(settings: Settings, run: Run) -> EvaluationResult:
    """Evaluate and apply the quality gate (raises QualityGateError when it refuses)."""
    run.pull(MATRIX, MODEL)
    paths = run.paths
    result = evaluate(paths.matrix, paths.model, paths.evaluation, run.params, live_metrics(settings))
    run.push(EVALUATION)  # a refused report too: it says why
    enforce_quality_gate(result)
    return result


def publish_stage(settings: Settings, run: Run, progress: bool = False) -> PublishResult:
    run.pull(MATRIX, MODEL, EVALUATION)
    paths = run.paths
    return publish(
        settings, paths.matrix, paths.model, paths.evaluation / "report.json", run.params, progress=progress,
        artifacts_key=paths.key if run.store else None,
    )


def prepare_publish_stage(settings: Settings, run: Run) -> str:
    run.pull(MATRIX, MODEL)
    return prepare_publish(settings, run.paths.matrix, run.paths.model, run.params)


def publish_shard_stage(settings: Settings, run: Run, shard: int, shards: int) -> ShardResult:
    run.pull(MATRIX, MODEL)
    return publish_shard(settings, run.paths.matrix, run.paths.model, run.params, shard, shards)


def finish_publish_stage(settings: Settings, run: Run, results: list[ShardResult], shards: int) -> PublishResult:
    run.pull(MATRIX, MODEL, EVALUATION)
    paths = run.paths
    return finish_publish(
        settings, paths.matrix, paths.model, paths.evaluation / "report.json", run.params, results, shards,
        artifacts_key=paths.key if run.store else None,
    )


def live_artifacts(settings: Settings, meta: dict) -> tuple[Path, Path]:
    """(matrix folder, model file) of a published version on this host: pulled from the shared
    store into the local artifacts folder when the version was published through one, else where
    its publisher wrote them (one machine, or a shared volume)."""
    run_store, key = artifact_store(settings), meta.get("artifacts_key")
    if run_store is None or key is None:
        return Path(meta["matrix_dir"]), Path(meta["model_path"])
    paths = RunPaths(settings.artifacts_dir, key)
    _pull_folders(run_store, paths, (MATRIX, MODEL))
    return paths.matrix, paths.model / "full.npz"


def tune_stage(settings: Settings, run: Run, n_trials: int) -> TunedParams:
    """Tune on the run's matrix and store the choice where every later run's planning finds it."""
    run.pull(MATRIX)
    tuned = tune_on_matrix(run.paths.matrix, run.params, n_trials)
    if run.store is None:
        save_tuned(settings, tuned)
        return tuned
    pull_tuned(settings, run.store)  # the dated history so far: the push below replaces the folder
    save_tuned(settings, tuned)
    artifacts.push(run.store, tuned_path(settings).parent, TUNED)
    return tuned


def run_pipeline(
    settings: Settings, end: datetime, params: PipelineParams, use_tuned: bool = True, progress: bool = False
) -> PipelineResult:
    run = plan_run(settings, end, params, use_tuned)
    return PipelineResult(
        run=run,
        extract=extract_stage(settings, run, progress),
        matrix=matrix_stage(run),
        train=train_stage(run, progress),
        evaluation=evaluate_stage(settings, run),
        publish=publish_stage(settings, run, progress),
    )
