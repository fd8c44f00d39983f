"""The whole pipeline in one process: the same stage functions the DAG calls, in order.

Every run works in a folder named by its data window end and params fingerprint, so a rerun of
the same run overwrites its own artifacts instead of piling up duplicates.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from recsys.evaluate import EvaluationResult, enforce_quality_gate, evaluate
from recsys.extract import ExtractResult, Window, extract
from recsys.matrix import MatrixResult, build_matrix
from recsys.params import PipelineParams
from recsys.publish import PublishResult, publish
from recsys.settings import Settings
from recsys.train import TrainResult, train


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
class PipelineResult:
    extract: ExtractResult
    matrix: MatrixResult
    train: TrainResult
    evaluation: EvaluationResult
    publish: PublishResult


def run_pipeline(settings: Settings, end: datetime, params: PipelineParams, progress: bool = False) -> PipelineResult:
    window = window_ending(end, params)
    paths = run_paths(settings, window, params)
    extracted = extract(settings, window, paths.extract, params, progress=progress)
    matrix = build_matrix(extracted.interactions, extracted.products, window, paths.matrix, params)
    trained = train(paths.matrix, paths.model, params, progress=progress)
    evaluation = evaluate(paths.matrix, paths.model, paths.evaluation, params)
    enforce_quality_gate(evaluation)
    published = publish(settings, paths.matrix, paths.model, evaluation.report_path, params, progress=progress)
    return PipelineResult(extracted, matrix, trained, evaluation, published)
