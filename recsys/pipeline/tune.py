"""Tune stage: choose ALS parameters on the shop's own recent data, for the daily DAG to use.

The split is time-based (the matrix stage's holdout cutoff): fit on what happened before the
cutoff, validate on the relevant interactions after it, with the daily evaluation's exclusions and
objective (MAP@K). The chosen parameters are stored as JSON next to the artifacts, with their
validation metrics and data window; :func:`with_tuned` folds them into a run's parameters.

Tuning never regresses: the search starts from the active tuned params (its trial 0 measures them
on the new validation window), and a result replaces them only if it is better on a comparable
window or they are older than ``tuned_max_age_days`` (:func:`promotion`). Every result is kept
under a unique name; :func:`keep_result` is meant to run under the tune lock (``stages``).
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from recsys.core.errors import InputError
from recsys.core.layout import TUNED, TUNED_LATEST, TUNED_RESULT_PREFIX
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
    # provenance; empty in results saved before results were kept under their own names
    result_id: str = ""
    started_from: str = "defaults"  # the result_id of the active params the search started from
    decision: str = ""  # why this result became active, or why it did not

    def to_dict(self) -> dict:
        return self.__dict__.copy()

    @property
    def map(self) -> float:
        return self.validation["chosen"]["map"]


def tuned_path(settings: Settings) -> Path:
    return settings.artifacts_dir / TUNED / TUNED_LATEST


def tune_on_matrix(
    matrix_dir: Path, params: PipelineParams, n_trials: int, start_from: TunedParams | None = None
) -> TunedParams:
    """Search on ``train.npz`` -> ``holdout.npz`` of a matrix built with raw (unscaled) weights,
    starting from ``start_from`` (the active tuned params) if given, else from ``params``."""
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
    if start_from is not None:
        values = start_from.params
        start = AlsParams(
            factors=values["factors"], regularization=values["regularization"], alpha=values["alpha"],
            iterations=values["iterations"], confidence=values["confidence_scaling"],
        )
    space = replace(PRODUCTION_SPACE, factors=tuple(sorted({*PRODUCTION_SPACE.factors, start.factors})))
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
    now = datetime.now(UTC)
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
        tuned_at=now.isoformat(),
        result_id=f"{stamp(now)}-{uuid.uuid4().hex[:8]}",
        started_from="defaults" if start_from is None else (start_from.result_id or "earlier tuned params"),
    )


def promotion(active: TunedParams | None, candidate: TunedParams, max_age_days: float, now: datetime) -> tuple[bool, str]:
    """(whether ``candidate`` replaces ``active``, why). Comparable means measured on the same
    validation window: both tuned on the same window, or the candidate's search started from the
    active params (its trial 0 measured them on the candidate's window)."""
    if active is None:
        return True, "no tuned params were active"
    age_days = (now - datetime.fromisoformat(active.tuned_at)).total_seconds() / 86400
    if age_days > max_age_days:
        return True, f"the active params ({active.result_id or active.tuned_at}) were {age_days:.1f} days old, over {max_age_days:g}"
    if candidate.window == active.window and candidate.holdout_cutoff == active.holdout_cutoff:
        theirs, where = active.map, "on the same validation window"
    elif active.result_id and candidate.started_from == active.result_id:
        theirs, where = candidate.validation["starting_params"]["map"], "re-measured on this validation window"
    else:
        return False, f"not comparable with the active params ({active.result_id or active.tuned_at}) and they are younger than {max_age_days:g} days"
    better = candidate.map > theirs
    verdict = "better than" if better else "not better than"
    return better, f"MAP@K {candidate.map:.4f} {verdict} the active params' {theirs:.4f} {where}"


def result_path(settings: Settings, tuned: TunedParams) -> Path:
    return tuned_path(settings).parent / f"{TUNED_RESULT_PREFIX}{tuned.result_id}.json"


def keep_result(settings: Settings, tuned: TunedParams, now: datetime | None = None) -> TunedParams:
    """Keep the result under its own name and make it active if :func:`promotion` says so; returns
    it with the decision. Call under the tune lock: reading the active params and replacing them
    must not interleave with another tune."""
    promote, reason = promotion(load_tuned(settings), tuned, settings.tuned_max_age_days, now or datetime.now(UTC))
    tuned = replace(tuned, decision=("activated: " if promote else "kept, not activated: ") + reason)
    log.info("tune result %s %s", tuned.result_id, tuned.decision)
    path = tuned_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(tuned.to_dict(), indent=2)
    result_path(settings, tuned).write_text(text)
    if promote:
        tmp = path.with_suffix(f".{uuid.uuid4().hex[:8]}.part")
        tmp.write_text(text)
        tmp.replace(path)  # atomic: a run never reads half a file
    return tuned


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
