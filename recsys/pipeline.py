"""A run: its effective params, data window and artifact folders, and the whole pipeline in one
process (the same stage functions the DAG calls, in order).

Every run works in a folder named by its data window end and params fingerprint, so a rerun of
the same run overwrites its own artifacts instead of piling up duplicates.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from recsys import store
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
from recsys.tune import load_tuned, with_tuned


def window_ending(end: datetime, params: PipelineParams) -> Window:
    # a plain datetime in UTC: Airflow hands over pendulum objects, whose arithmetic can drop tzinfo
    end = datetime.fromtimestamp(end.timestamp(), tz=UTC)
    return Window(start=end - timedelta(days=params.lookback_days), end=end)


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def extract(self) -> Path:
        return self.root / "extract"

    @property
    def matrix(self) -> Path:
        return self.root / "matrix"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def evaluation(self) -> Path:
        return self.root / "eval"


def run_paths(settings: Settings, window: Window, params: PipelineParams) -> RunPaths:
    return RunPaths(settings.artifacts_dir / "runs" / f"{window.end:%Y%m%dT%H%M%SZ}" / params.fingerprint())


@dataclass(frozen=True)
class Run:
    """Everything a stage needs to know about its run; small enough for an Airflow XCom."""

    params: PipelineParams
    window: Window
    paths: RunPaths

    def to_dict(self) -> dict:
        return {"params": self.params.to_dict(), "window": self.window.to_dict(), "root": str(self.paths.root)}

    @classmethod
    def from_dict(cls, values: dict) -> Run:
        return cls(
            PipelineParams.from_dict(values["params"]),
            Window.from_dict(values["window"]),
            RunPaths(Path(values["root"])),
        )


def plan_run(settings: Settings, end: datetime, params: PipelineParams, use_tuned: bool = True) -> Run:
    """Fix a run's effective params once (tuned values for fields left at their defaults)."""
    effective = with_tuned(params, load_tuned(settings)) if use_tuned else params
    window = window_ending(end, effective)
    return Run(effective, window, run_paths(settings, window, effective))


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
# run_pipeline all call these, so they cannot drift apart.


def extract_stage(settings: Settings, run: Run, progress: bool = False) -> ExtractResult:
    return extract(settings, run.window, run.paths.extract, run.params, progress=progress)


def matrix_stage(run: Run) -> MatrixResult:
    extracted = run.paths.extract
    return build_matrix(
        extracted / "interactions.parquet", extracted / "products.parquet", run.window, run.paths.matrix, run.params
    )


def train_stage(run: Run, progress: bool = False) -> TrainResult:
    return train(run.paths.matrix, run.paths.model, run.params, progress=progress)


def evaluate_stage(settings: Settings, run: Run) -> EvaluationResult:
    """Evaluate and apply the quality gate (raises QualityGateError when it refuses)."""
    paths = run.paths
    result = evaluate(paths.matrix, paths.model, paths.evaluation, run.params, live_metrics(settings))
    enforce_quality_gate(result)
    return result


def publish_stage(settings: Settings, run: Run, progress: bool = False) -> PublishResult:
    paths = run.paths
    return publish(settings, paths.matrix, paths.model, paths.evaluation / "report.json", run.params, progress=progress)


def prepare_publish_stage(settings: Settings, run: Run) -> str:
    return prepare_publish(settings, run.paths.matrix, run.paths.model, run.params)


def publish_shard_stage(settings: Settings, run: Run, shard: int, shards: int) -> ShardResult:
    return publish_shard(settings, run.paths.matrix, run.paths.model, run.params, shard, shards)


def finish_publish_stage(settings: Settings, run: Run, results: list[ShardResult], shards: int) -> PublishResult:
    paths = run.paths
    return finish_publish(
        settings, paths.matrix, paths.model, paths.evaluation / "report.json", run.params, results, shards
    )


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
