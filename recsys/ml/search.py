"""Hyperparameter search for ALS on a (fit, validation) pair of user x item matrices.

The split is the caller's business (per-user random for the MovieLens benchmark, time-based in
the production DAG); this module only ever sees the two matrices it is given, so a test split
can't leak in as long as the caller carves validation out of its training data.

Search: optuna's TPE sampler, seeded, one trial at a time (so a run is reproducible), with a
sane implicit-default configuration enqueued first so the result is never worse than it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import scipy.sparse as sp

from recsys.core.params import PipelineParams
from recsys.ml.als import fit_als
from recsys.ml.metrics import RankingMetrics
from recsys.ml.weighting import BM25_B, ConfidenceScaling, scale_confidence

log = logging.getLogger(__name__)

Objective = Literal["map", "ndcg", "precision", "recall"]


PIPELINE_DEFAULTS = PipelineParams()


@dataclass(frozen=True)
class AlsParams:
    """ALS settings as the search sees them; the defaults are the pipeline's (PipelineParams)."""

    factors: int = PIPELINE_DEFAULTS.factors
    regularization: float = PIPELINE_DEFAULTS.regularization
    alpha: float = PIPELINE_DEFAULTS.alpha
    iterations: int = PIPELINE_DEFAULTS.iterations
    # 0 = implicit's ALS with one penalty for every row; > 0 = a frequency-scaled penalty, which
    # only a fitter that implements it takes (the benchmark's recsys.bench.frequency_scaled)
    regularization_exponent: float = 0.0
    confidence: ConfidenceScaling = PIPELINE_DEFAULTS.confidence_scaling
    bm25_b: float = BM25_B

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


@dataclass(frozen=True)
class SearchSpace:
    factors: tuple[int, ...] = (32, 64, 128, 256)
    regularization: tuple[float, float] = (1e-2, 1e3)  # log-uniform
    alpha: tuple[float, float] = (0.1, 50.0)  # log-uniform
    iterations: tuple[int, int] = (8, 24)
    regularization_exponent: tuple[float, float] = (0.0, 0.0)
    confidence: tuple[ConfidenceScaling, ...] = ("none", "log", "bm25")
    bm25_b: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True)
class Trial:
    number: int
    params: AlsParams
    metrics: RankingMetrics
    seconds: float


@dataclass(frozen=True)
class TuningResult:
    params: AlsParams
    validation: RankingMetrics
    objective: Objective
    seconds: float
    trials: list[Trial] = field(default_factory=list)


def fit(user_items: sp.csr_matrix, params: AlsParams, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale the raw values as ``params.confidence`` says, then fit implicit's ALS; returns the factors."""
    if params.regularization_exponent > 0:
        raise ValueError(
            "regularization_exponent > 0 needs the frequency-scaled solver: pass recsys.bench.frequency_scaled.fit "
            "as the fitter"
        )
    weighted = scale_confidence(user_items, params.confidence, bm25_b=params.bm25_b)
    return fit_als(
        weighted,
        factors=params.factors,
        regularization=params.regularization,
        alpha=params.alpha,
        iterations=params.iterations,
        seed=seed,
    )


# (matrix, params, seed) -> (user factors, item factors)
Fitter = Callable[[sp.csr_matrix, AlsParams, int], tuple[np.ndarray, np.ndarray]]


def validation_metrics(
    fit_matrix: sp.csr_matrix,
    validation: sp.csr_matrix,
    params: AlsParams,
    seed: int,
    k: int = 10,
    exclude: sp.csr_matrix | None = None,
    blocked_items: np.ndarray | None = None,
    fitter: Fitter = fit,
) -> RankingMetrics:
    """Fit on ``fit_matrix``, rank for users with a validation item, ``exclude`` items removed
    (default: their fit items).

    Items nobody has in ``fit_matrix`` are never recommended: a model can't know them; nor are
    ``blocked_items`` (e.g. inactive products).
    """
    from recsys.ml.evaluation import evaluate_factors  # numba's kernels: not for who only plans a run

    user_factors, item_factors = fitter(fit_matrix, params, seed)
    blocked = np.flatnonzero(np.diff(fit_matrix.tocsc().indptr) == 0)
    if blocked_items is not None:
        blocked = np.union1d(blocked, blocked_items)
    exclude = fit_matrix if exclude is None else exclude
    return evaluate_factors(user_factors, item_factors, exclude, validation, k, blocked_items=blocked).metrics


def _suggest(trial, space: SearchSpace) -> AlsParams:
    confidence = trial.suggest_categorical("confidence", list(space.confidence))
    return AlsParams(
        factors=trial.suggest_categorical("factors", list(space.factors)),
        regularization=trial.suggest_float("regularization", *space.regularization, log=True),
        alpha=trial.suggest_float("alpha", *space.alpha, log=True),
        iterations=trial.suggest_int("iterations", *space.iterations),
        regularization_exponent=trial.suggest_float("regularization_exponent", *space.regularization_exponent),
        confidence=confidence,
        # only meaningful for bm25; fixed otherwise so TPE doesn't model a dead dimension
        bm25_b=trial.suggest_float("bm25_b", *space.bm25_b) if confidence == "bm25" else BM25_B,
    )


def tune(
    fit_matrix: sp.csr_matrix,
    validation: sp.csr_matrix,
    n_trials: int = 60,
    seed: int = 42,
    k: int = 10,
    objective: Objective = "ndcg",
    space: SearchSpace | None = None,
    start: AlsParams | None = None,
    exclude: sp.csr_matrix | None = None,
    blocked_items: np.ndarray | None = None,
    fitter: Fitter = fit,
) -> TuningResult:
    """Search ALS hyperparameters maximising ``objective``@k of ``fit_matrix`` -> ``validation``.

    ``start`` (default: ``AlsParams()``, the pipeline's defaults, if it lies in the space) is tried
    first. Every trial fits with the same ``seed``, so trials differ only by their parameters.
    ``exclude`` / ``blocked_items`` as in :func:`validation_metrics`.
    """
    import optuna

    if fit_matrix.shape != validation.shape:
        raise ValueError(f"fit matrix {fit_matrix.shape} and validation {validation.shape} differ in shape")
    space = space or SearchSpace()
    start = start or AlsParams()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    if start.factors in space.factors and start.confidence in space.confidence:
        study.enqueue_trial({name: value for name, value in start.to_dict().items() if name != "bm25_b"})

    trials: list[Trial] = []

    def run(trial) -> float:
        params = _suggest(trial, space)
        began = time.perf_counter()
        metrics = validation_metrics(fit_matrix, validation, params, seed, k, exclude, blocked_items, fitter)
        trials.append(Trial(trial.number, params, metrics, time.perf_counter() - began))
        log.info("trial %d %s: %s=%.4f", trial.number, params, objective, getattr(metrics, objective))
        return getattr(metrics, objective)

    began = time.perf_counter()
    study.optimize(run, n_trials=n_trials)
    best = max(trials, key=lambda t: getattr(t.metrics, objective))
    return TuningResult(best.params, best.metrics, objective, time.perf_counter() - began, trials)
