"""ALS settings as one value, fitted and scored on a (fit, validation) pair of user x item
matrices: what ``recsys bench defaults`` compares (the search itself, for every family, is
``recsys.ml.tuning``).

The split is the caller's business; this module only ever sees the two matrices it is given, so a
test split can't leak in as long as the caller carves validation out of its training data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp

from recsys.core.params import PipelineParams
from recsys.ml.als import fit_als
from recsys.ml.metrics import RankingMetrics
from recsys.ml.weighting import BM25_B, ConfidenceScaling, scale_confidence

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
