"""Tune stage: choose the params of each model family on the shop's own recent data, for the
daily DAG to use.

The split is time-based (the matrix stage's holdout cutoff): fit on what happened before the
cutoff, validate on the relevant interactions after it, with the daily evaluation's exclusions and
objective (MAP@K). ALS is always tuned first: it also chooses the confidence scaling, which every
family of a run fits on; the other families asked for are then tuned on that scaling
(``recsys.ml.tuning``: seeded, one BLAS thread, each trial the mean of ``repeats`` fits, reported
with its sd). The chosen parameters are stored as JSON next to the artifacts, with their
validation metrics and data window; :func:`with_tuned` folds them into a run's parameters.

Tuning never regresses: each family's search starts from its active tuned params (trial 0
measures them on the new validation window), and a result replaces them only if no family is
worse and one is better on a comparable window, or they are older than ``tuned_max_age_days``
(:func:`promotion`). Every result is kept under a unique name; :func:`keep_result` is meant to run
under the tune lock (``stages``).
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from recsys.core.errors import InputError
from recsys.core.layout import TUNED, TUNED_LATEST, TUNED_RESULT_PREFIX
from recsys.core.params import MODEL_FAMILIES, TUNABLE_FAMILY_PARAMS, TUNE_REPEATS, PipelineParams
from recsys.core.settings import Settings
from recsys.core.window import stamp

if TYPE_CHECKING:
    from recsys.ml import tuning

log = logging.getLogger(__name__)

# What tuning may change in a run besides ``family_params``: ALS's settings and the scaling
# every family fits on; everything else stays as the run's params say.
TUNED_FIELDS = ("factors", "regularization", "alpha", "iterations", "confidence_scaling")
ALS_FIELDS = TUNED_FIELDS[:4]


@dataclass(frozen=True)
class TunedParams:
    params: dict  # TUNED_FIELDS -> value (ALS's, and the scaling)
    validation: dict  # ALS's: metrics of the chosen params and of the starting params, with their sd
    window: dict
    holdout_cutoff: str
    trials: int
    seconds: float
    tuned_at: str
    # provenance; empty in results saved before results were kept under their own names
    result_id: str = ""
    started_from: str = "defaults"  # the result_id of the active params the search started from
    decision: str = ""  # why this result became active, or why it did not
    # the other families: name -> {params, validation, trials, seconds}, or {skipped: why}; an
    # entry not tuned this time but active before is carried over with "carried_from"
    families: dict = field(default_factory=dict)
    repeats: int = 1  # fits per trial of the families with randomness

    def to_dict(self) -> dict:
        return self.__dict__.copy()

    @property
    def map(self) -> float:
        return self.validation["chosen"]["map"]

    def family_params(self) -> dict[str, dict]:
        """The tuned params of the families other than ALS, as ``PipelineParams.family_params``."""
        return {name: entry["params"] for name, entry in self.families.items() if "params" in entry}

    def measured(self) -> dict[str, float]:
        """Chosen MAP@K per family tuned in this result (not carried over)."""
        values = {"als": self.map}
        values.update({name: entry["validation"]["chosen"]["map"] for name, entry in self.families.items()
                       if "params" in entry and "carried_from" not in entry})
        return values

    def started_at(self) -> dict[str, float]:
        """MAP@K of each tuned family's starting params, measured on this result's window."""
        values = {"als": self.validation["starting_params"]["map"]}
        values.update({name: entry["validation"]["starting_params"]["map"] for name, entry in self.families.items()
                       if "params" in entry and "carried_from" not in entry})
        return values


def tuned_path(settings: Settings) -> Path:
    return settings.artifacts_dir / TUNED / TUNED_LATEST


def _validation(result: tuning.FamilyTuning) -> dict:
    return {"chosen": result.best.mean, "chosen_sd": result.best.sd,
            "starting_params": result.start.mean, "starting_params_sd": result.start.sd}


def tune_on_matrix(
    matrix_dir: Path,
    params: PipelineParams,
    n_trials: int,
    start_from: TunedParams | None = None,
    families: tuple[str, ...] = ("als",),
    repeats: int = TUNE_REPEATS,
) -> TunedParams:
    """Search on ``train.npz`` -> ``holdout.npz`` of a matrix built with raw (unscaled) weights:
    ALS, then each other family of ``families`` (``n_trials`` each; a blend has nothing to tune),
    each starting from ``start_from`` (the active tuned params) if it has them, else ALS from
    ``params`` and the others from their defaults."""
    if params.confidence_scaling != "none":
        raise InputError("build the tuning matrix with confidence_scaling='none': tuning chooses the scaling")
    unknown = sorted(set(families) - set(MODEL_FAMILIES))
    if unknown:
        raise InputError(f"unknown model families to tune: {', '.join(unknown)}; known: {', '.join(MODEL_FAMILIES)}")
    # the search's libraries only here: every stage plans its run with this module (``with_tuned``)
    from recsys.ml import tuning
    from recsys.pipeline.matrix import holdout_split

    split = holdout_split(matrix_dir)
    manifest = split.manifest
    data = tuning.TuningData(split.fit, split.validation, split.exclude, split.blocked_items)
    common = {"n_trials": n_trials, "seed": params.seed, "k": params.k, "objective": "map", "repeats": repeats}
    # the run's ALS settings with the pipeline's default scaling: the search starts where runs are
    als_start = {name: getattr(params, name) for name in ALS_FIELDS}
    scaling = PipelineParams().confidence_scaling
    if start_from is not None:
        als_start = {name: start_from.params[name] for name in ALS_FIELDS}
        scaling = start_from.params["confidence_scaling"]
    als = tuning.tune("als", data, als_start, scaling, **common)
    scaling = als.best.confidence_scaling
    seconds = als.seconds
    tuned_families: dict[str, dict] = {}
    for family in (name for name in TUNABLE_FAMILY_PARAMS if name in families):
        active = (start_from.families if start_from is not None else {}).get(family, {})
        try:
            result = tuning.tune(family, data, active.get("params", {}), scaling, **common)
        except InputError as refused:  # EASE / item-kNN above their catalogue limit: the daily run skips them too
            tuned_families[family] = {"skipped": str(refused)}
            log.info("%s not tuned: %s", family, refused)
            continue
        seconds += result.seconds
        tuned_families[family] = {"params": result.best.params, "validation": _validation(result),
                                  "trials": len(result.trials), "seconds": round(result.seconds, 2)}
    if start_from is not None:  # the active params of a family not tuned now stay what they were
        for family, entry in start_from.families.items():
            if "params" in entry and "params" not in tuned_families.get(family, {}):
                tuned_families[family] = {**entry, "carried_from": entry.get("carried_from", start_from.result_id)}
    now = datetime.now(UTC)
    return TunedParams(
        params={**als.best.params, "confidence_scaling": scaling},
        validation=_validation(als),
        window=manifest["window"],
        holdout_cutoff=manifest["holdout_cutoff"],
        trials=len(als.trials),
        seconds=round(seconds, 2),
        tuned_at=now.isoformat(),
        result_id=f"{stamp(now)}-{uuid.uuid4().hex[:8]}",
        started_from="defaults" if start_from is None else (start_from.result_id or "earlier tuned params"),
        families=tuned_families,
        repeats=repeats,
    )


def promotion(active: TunedParams | None, candidate: TunedParams, max_age_days: float, now: datetime) -> tuple[bool, str]:
    """(whether ``candidate`` replaces ``active``, why): only if no family tuned in ``candidate``
    is worse than the active params and one is better. Comparable means measured on the same
    validation window: both tuned on the same window, or the candidate's search started from the
    active params (its trial 0 measured them on the candidate's window). A family the active
    params have no tuned values for is compared with its defaults (where its search started)."""
    if active is None:
        return True, "no tuned params were active"
    age_days = (now - datetime.fromisoformat(active.tuned_at)).total_seconds() / 86400
    if age_days > max_age_days:
        return True, f"the active params ({active.result_id or active.tuned_at}) were {age_days:.1f} days old, over {max_age_days:g}"
    mine, started = candidate.measured(), candidate.started_at()
    if candidate.window == active.window and candidate.holdout_cutoff == active.holdout_cutoff:
        theirs, where = {**started, **{name: value for name, value in active.measured().items() if name in mine}}, \
            "on the same validation window"
    elif active.result_id and candidate.started_from == active.result_id:
        theirs, where = started, "re-measured on this validation window"
    else:
        return False, f"not comparable with the active params ({active.result_id or active.tuned_at}) and they are younger than {max_age_days:g} days"
    better = any(mine[name] > theirs[name] for name in mine)
    worse = any(mine[name] < theirs[name] for name in mine)
    verdicts = ", ".join(
        f"{name} MAP@K {mine[name]:.4f} {'better than' if mine[name] > theirs[name] else 'not better than'} "
        f"the active params' {theirs[name]:.4f}" for name in mine
    )
    return better and not worse, f"{verdicts} {where}"


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
    # per family: a family the run gave params of its own keeps them
    family_params = {**tuned.family_params(), **params.family_params}
    if family_params != params.family_params:
        overrides["family_params"] = family_params
    if overrides:
        log.info("using tuned params %s (tuned on %s)", overrides, tuned.window)
    return replace(params, **overrides)
