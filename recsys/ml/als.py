"""ALS factor models: fitted with implicit, saved and loaded as plain npz (never pickle)."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import scipy.sparse as sp


def fit_als(
    user_items: sp.csr_matrix,
    factors: int,
    regularization: float,
    alpha: float,
    iterations: int,
    seed: int,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit implicit's CPU ALS; returns (user_factors, item_factors) as float32 arrays.

    implicit runs its own thread pool; a multi-threaded BLAS underneath it oversubscribes the
    cores, so BLAS is held to one thread while fitting (what implicit's own warning asks for).
    """
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        model = AlternatingLeastSquares(
            factors=factors,
            regularization=regularization,
            alpha=alpha,
            iterations=iterations,
            random_state=seed,
        )
        model.fit(user_items.tocsr().astype(np.float32, copy=False), show_progress=progress)
    return np.asarray(model.user_factors), np.asarray(model.item_factors)


def load_factors(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as saved:
        return saved["user_factors"], saved["item_factors"]


def library_versions() -> dict[str, str]:
    import implicit
    import scipy

    return {
        "python": platform.python_version(),
        "implicit": implicit.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }
