"""Hyperparameter search per model family on one (fit, validation) pair, made to reproduce.

Search: optuna's TPE sampler, seeded, one trial at a time, every trial fitted and scored on one
BLAS thread (the same sums in the same order on every run). Trial 0 is the starting params (the
active tuned ones, or the family's defaults), so the result is never worse than them on this
validation. Repeated validation: a trial fits ``repeats`` times, with seeds seed, seed + 1, ...,
all scored on the same held-out items; its objective is the mean, and the standard deviation is
reported with it (EASE and item-kNN have no randomness: they fit once, sd 0). Every trial uses the
same seeds, so trials differ only by their params, and two runs on one machine give the same
chosen params and numbers (tests/pipeline/test_tune.py).

ALS also chooses the confidence scaling of the weights (``recsys.ml.weighting``), which every
family of a run fits on: the other families are tuned on the scaling given to them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from recsys.ml.families import make, single_blas_thread
from recsys.ml.selection import METRICS, ValidationSplit, validation_metrics
from recsys.ml.weighting import scale_confidence

log = logging.getLogger(__name__)

Objective = Literal["map", "ndcg", "precision", "recall"]
DETERMINISTIC_FAMILIES = frozenset({"ease", "item_knn"})  # no seed: one fit per trial
SCALINGS = ("none", "log", "bm25")


@dataclass(frozen=True)
class TuningData:
    """Raw (unscaled) fit weights, the held-out relevant items, and what is never listed."""

    fit: sp.csr_matrix
    validation: sp.csr_matrix
    exclude: sp.csr_matrix | None = None  # per user; default: the fit items
    blocked_items: np.ndarray | None = None


@dataclass(frozen=True)
class Trial:
    number: int
    params: dict[str, Any]
    confidence_scaling: str
    mean: dict[str, float]  # METRICS, mean over the repeats
    sd: dict[str, float]  # their standard deviation (ddof 1; 0 for one fit)
    seconds: float


@dataclass(frozen=True)
class FamilyTuning:
    family: str
    best: Trial
    start: Trial  # trial 0: the starting params
    repeats: int  # fits per trial
    seconds: float
    trials: list[Trial] = field(default_factory=list)


def _span(bounds: tuple[float, float], value: float) -> tuple[float, float]:
    """``bounds`` widened to hold a positive ``value`` (a start outside the usual range)."""
    return (min(bounds[0], value), max(bounds[1], value)) if value > 0 else bounds


def _als(trial, start: dict[str, Any], scaling: str) -> tuple[dict[str, Any], str]:
    params = {
        "factors": trial.suggest_categorical("factors", sorted({32, 64, 128, 256, start["factors"]})),
        "regularization": trial.suggest_float("regularization", *_span((1e-2, 1e3), start["regularization"]), log=True),
        "alpha": trial.suggest_float("alpha", *_span((0.1, 50.0), start["alpha"]), log=True),
        "iterations": trial.suggest_int("iterations", min(8, start["iterations"]), max(24, start["iterations"])),
    }
    return params, trial.suggest_categorical("confidence_scaling", list(SCALINGS))


def _bpr(trial, start: dict[str, Any], scaling: str) -> tuple[dict[str, Any], str]:
    return {
        "factors": trial.suggest_categorical("factors", sorted({32, 64, 128, start["factors"]})),
        "learning_rate": trial.suggest_float("learning_rate", *_span((1e-3, 0.2), start["learning_rate"]), log=True),
        "regularization": trial.suggest_float("regularization", *_span((1e-4, 0.1), start["regularization"]), log=True),
        "iterations": trial.suggest_int("iterations", min(50, start["iterations"]), max(300, start["iterations"])),
    }, scaling


def _item_knn(trial, start: dict[str, Any], scaling: str) -> tuple[dict[str, Any], str]:
    similarity = trial.suggest_categorical("similarity", ["bm25", "cosine"])
    params = {**start, "similarity": similarity,
              "neighbours": trial.suggest_int("neighbours", min(10, start["neighbours"]),
                                              max(1000, start["neighbours"]), log=True)}
    if similarity == "bm25":  # k1 and b mean nothing to cosine: TPE models no dead dimension
        params["bm25_k1"] = trial.suggest_float("bm25_k1", *_span((0.3, 3.0), start["bm25_k1"]))
        params["bm25_b"] = trial.suggest_float("bm25_b", 0.0, 1.0)
    return params, scaling


def _ease(trial, start: dict[str, Any], scaling: str) -> tuple[dict[str, Any], str]:
    return {**start, "regularization": trial.suggest_float(
        "regularization", *_span((10.0, 1e4), start["regularization"]), log=True)}, scaling


# family -> (optuna trial, start params, scaling) -> (params, scaling); a blend has none: its
# weight is chosen in every run
SPACES: dict[str, Callable[[Any, dict[str, Any], str], tuple[dict[str, Any], str]]] = {
    "als": _als, "bpr": _bpr, "item_knn": _item_knn, "ease": _ease,
}


def _fit_seeds(family: str, seed: int, repeats: int) -> list[int]:
    """The seeds of a trial's fits: one fit for a family without randomness."""
    return [seed] if family in DETERMINISTIC_FAMILIES else [seed + repeat for repeat in range(repeats)]


def default_params(family: str) -> dict[str, Any]:
    return make(family).params()


def score(
    family: str, params: dict[str, Any], scaling: str, data: TuningData, seed: int, repeats: int, k: int,
    weighted: dict[str, sp.csr_matrix] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """(mean, sd) of METRICS@k over the repeats, on one BLAS thread. ``weighted``: a cache of the
    fit weights per scaling. Raises InputError if the family refuses the data (catalogue size)."""
    weighted = {} if weighted is None else weighted
    if scaling not in weighted:
        weighted[scaling] = scale_confidence(data.fit, scaling)
    split = ValidationSplit(weighted[scaling], data.validation, exclude=data.fit if data.exclude is None else data.exclude,
                            blocked_items=data.blocked_items)
    with single_blas_thread():
        rows = [validation_metrics(make(family, **params).fit(split.fit, fit_seed), split, k)
                for fit_seed in _fit_seeds(family, seed, repeats)]
    mean = {name: float(np.mean([row[name] for row in rows])) for name in METRICS}
    sd = {name: float(np.std([row[name] for row in rows], ddof=1)) if len(rows) > 1 else 0.0 for name in METRICS}
    return mean, sd


def tune(
    family: str,
    data: TuningData,
    start: dict[str, Any],
    scaling: str,
    n_trials: int,
    seed: int = 42,
    k: int = 10,
    objective: Objective = "map",
    repeats: int = 3,
) -> FamilyTuning:
    """Search ``family``'s params maximising the mean ``objective``@k, from ``start`` (trial 0)
    at confidence ``scaling`` (ALS searches the scaling too; the others keep it)."""
    import optuna

    if data.fit.shape != data.validation.shape:
        raise ValueError(f"fit matrix {data.fit.shape} and validation {data.validation.shape} differ in shape")
    suggest = SPACES[family]
    start = {**default_params(family), **start}
    weighted: dict[str, sp.csr_matrix] = {}
    trials: list[Trial] = []

    def run(number: int, params: dict[str, Any], trial_scaling: str) -> float:
        began = time.perf_counter()
        mean, sd = score(family, params, trial_scaling, data, seed, repeats, k, weighted)
        trials.append(Trial(number, params, trial_scaling, mean, sd, time.perf_counter() - began))
        log.info("%s trial %d %s %s: %s=%.4f ± %.4f", family, number, params, trial_scaling, objective,
                 mean[objective], sd[objective])
        return mean[objective]

    began = time.perf_counter()
    # trial 0 outside optuna: a start outside the space (a hand-set param) is still measured as it is
    run(0, start, scaling)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(lambda trial: run(trial.number + 1, *suggest(trial, start, scaling)), n_trials=n_trials - 1)
    best = max(trials, key=lambda t: t.mean[objective])  # the first of equals: the start unless beaten
    return FamilyTuning(family, best, trials[0], len(_fit_seeds(family, seed, repeats)), time.perf_counter() - began, trials)
