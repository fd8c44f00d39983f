"""Tune stage: choose ALS parameters on the shop's own recent data, for the daily DAG to use.

The split is time-based (the matrix stage's holdout cutoff): fit on what happened before the
cutoff, validate on the relevant interactions after it, with the daily evaluation's exclusions and
objective (MAP@K). The chosen parameters are stored as JSON next to the artifacts, with their
validation metrics and data window; :func:`with_tuned` folds them into a run's parameters.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from recsys.core.errors import InputError
from recsys.core.layout import TUNED, TUNED_LATEST
from recsys.core.params import PipelineParams
from recsys.core.settings import Settings
from recsys.core.window import stamp
from recsys.ml.search import AlsParams, SearchSpace, tune
from recsys.pipeline.matrix import holdout_split

log = logging.getLogger(__name__)

# What tuning may change in a run; everything else stays as the run's params say.
TUNED_FIELDS = ("factors", "regularization", "alpha", "iterations", "confidence_scaling")

# The frequency-scaled solver is a NumPy benchmark tool (memory O(nnz x factors)); production
# tunes implicit's own ALS, and BM25 with its usual b.
PRODUCTION_SPACE = SearchSpace(regularization_exponent=(0.0, 0.0), bm25_b=(0.75, 0.75))


@dataclass(frozen=True)
class TunedParams:
    params: dict  # TUNED_FIELDS -> value
    validation: dict  # metrics of the chosen params and of the run's starting params
    window: dict
    holdout_cutoff: str
    trials: int
    seconds: float
    tuned_at: str

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def tuned_path(settings: Settings) -> Path:
    return settings.artifacts_dir / TUNED / TUNED_LATEST


def tune_on_matrix(matrix_dir: Path, params: PipelineParams, n_trials: int) -> TunedParams:
    """Search on ``train.npz`` -> ``holdout.npz`` of a matrix built with raw (unscaled) weights."""
    if params.confidence_scaling != "none":
        raise InputError("build the tuning matrix with confidence_scaling='none': tuning chooses the scaling")
    split = holdout_split(matrix_dir)
    manifest = split.manifest
    # the run's ALS settings with the pipeline's default scaling: the search starts where runs are
    start = AlsParams(
        factors=params.factors,
        regularization=params.regularization,
        alpha=params.alpha,
        iterations=params.iterations,
        confidence=PipelineParams().confidence_scaling,
    )
    space = replace(PRODUCTION_SPACE, factors=tuple(sorted({*PRODUCTION_SPACE.factors, params.factors})))
    result = tune(
        split.fit,
        split.validation,
        n_trials=n_trials,
        seed=params.seed,
        k=params.k,
        objective="map",
        space=space,
        start=start,
        exclude=split.exclude,
        blocked_items=split.blocked_items,
    )
    baseline = next(trial for trial in result.trials if trial.number == 0)
    chosen = result.params
    return TunedParams(
        params={
            "factors": chosen.factors,
            "regularization": chosen.regularization,
            "alpha": chosen.alpha,
            "iterations": chosen.iterations,
            "confidence_scaling": chosen.confidence,
        },
        validation={"chosen": result.validation.to_dict(), "starting_params": baseline.metrics.to_dict()},
        window=manifest["window"],
        holdout_cutoff=manifest["holdout_cutoff"],
        trials=len(result.trials),
        seconds=round(result.seconds, 2),
        tuned_at=datetime.now(UTC).isoformat(),
    )


def save_tuned(settings: Settings, tuned: TunedParams) -> Path:
    """Write ``tuned/latest.json`` (what runs pick up) and a dated copy (the history)."""
    path = tuned_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(tuned.to_dict(), indent=2)
    end = datetime.fromisoformat(tuned.window["end"])
    (path.parent / f"{stamp(end)}.json").write_text(text)
    tmp = path.with_suffix(f".{uuid.uuid4().hex[:8]}.part")  # concurrent tunes never share it
    tmp.write_text(text)
    tmp.replace(path)  # atomic: a run never reads half a file
    return path


def load_tuned(settings: Settings) -> TunedParams | None:
    path = tuned_path(settings)
    if not path.exists():
        return None
    return TunedParams(**json.loads(path.read_text()))


def with_tuned(params: PipelineParams, tuned: TunedParams | None) -> PipelineParams:
    """Tuned values replace the fields a run left at their defaults; explicit choices win."""
    if tuned is None:
        return params
    defaults = PipelineParams()
    overrides = {
        name: tuned.params[name]
        for name in TUNED_FIELDS
        if name in tuned.params and getattr(params, name) == getattr(defaults, name)
    }
    if overrides:
        log.info("using tuned params %s (tuned on %s)", overrides, tuned.window)
    return replace(params, **overrides)
