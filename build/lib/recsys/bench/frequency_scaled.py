"""Frequency-scaled iALS (Rendle et al. 2022, "Revisiting the performance of iALS on item
recommendation benchmarks"): a research solver the MovieLens benchmark's search may choose.
Production never uses it (its memory is O(nnz x factors) per half-step); it fits with
``recsys.ml.als.fit_als``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from recsys.ml import search
from recsys.ml.weighting import scale_confidence


def fit(user_items: sp.csr_matrix, params: search.AlsParams, seed: int, cg_steps: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A ``search.Fitter`` that also takes ``regularization_exponent`` > 0 (this solver); at 0 it
    is ``search.fit``, implicit unchanged. ``cg_steps``: implicit's own default is also 3."""
    if params.regularization_exponent <= 0:
        return search.fit(user_items, params, seed)
    weighted = scale_confidence(user_items, params.confidence, bm25_b=params.bm25_b)
    return fit_frequency_scaled(
        weighted, params.factors, params.regularization, params.alpha, params.iterations, seed,
        params.regularization_exponent, cg_steps,
    )


def fit_frequency_scaled(
    user_items: sp.csr_matrix,
    factors: int,
    regularization: float,
    alpha: float,
    iterations: int,
    seed: int,
    exponent: float,
    cg_steps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """iALS with implicit's loss but a per-row penalty: sum_ui c_ui (p_ui - x_u.y_i)^2 + sum_u l_u|x_u|^2 + ...

    c_ui = 1 + alpha * r_ui, p_ui = [r_ui > 0], as in implicit. l_u = regularization *
    (w_u / mean w)^exponent where w_u = n_items + alpha * sum_i r_ui is the row's total confidence
    weight: heavy rows get proportionally more penalty, so one ``regularization`` fits light and
    heavy users (and niche and hit items) alike. Normalising by the mean keeps ``regularization`` on
    the same scale as the unscaled penalty. Each half-step runs ``cg_steps`` of conjugate gradient
    warm-started from the previous factors, like implicit's default solver, vectorised over rows.
    Memory is O(nnz * factors) per half-step: sized for benchmark data (ML-100k), not for
    production windows, where implicit (exponent 0) is the solver.
    """
    user_items = user_items.tocsr().astype(np.float32)
    item_users = user_items.T.tocsr()
    rng = np.random.default_rng(seed)
    # implicit's initialisation scale: small uniform factors
    user_factors = (rng.random((user_items.shape[0], factors), dtype=np.float32) * 0.01).astype(np.float32)
    item_factors = (rng.random((user_items.shape[1], factors), dtype=np.float32) * 0.01).astype(np.float32)
    user_penalty = _row_penalty(user_items, alpha, regularization, exponent)
    item_penalty = _row_penalty(item_users, alpha, regularization, exponent)
    for _ in range(iterations):
        user_factors = _conjugate_gradient(user_items, item_factors, user_factors, user_penalty, alpha, cg_steps)
        item_factors = _conjugate_gradient(item_users, user_factors, item_factors, item_penalty, alpha, cg_steps)
    return user_factors, item_factors


def _row_penalty(rows: sp.csr_matrix, alpha: float, regularization: float, exponent: float) -> np.ndarray:
    weight = rows.shape[1] + alpha * np.asarray(rows.sum(axis=1), dtype=np.float64).ravel()
    return (regularization * (weight / weight.mean()) ** exponent).astype(np.float32)


def _conjugate_gradient(
    rows: sp.csr_matrix,
    fixed: np.ndarray,
    start: np.ndarray,
    penalty: np.ndarray,
    alpha: float,
    steps: int,
) -> np.ndarray:
    """A few CG steps on every row's normal equations at once.

    Row u solves (Y'Y + Y_u' diag(alpha r_u) Y_u + l_u I) x = Y_u' (1 + alpha r_u); the sparse
    term is applied as per-nonzero dot products, so no per-row Gram matrix is ever formed.
    """
    gram = fixed.T @ fixed
    extra = rows.copy()
    extra.data = alpha * extra.data
    row_sizes = np.diff(rows.indptr)
    observed_fixed = fixed[rows.indices]  # gathered once: the same for every CG step

    def apply(vectors: np.ndarray) -> np.ndarray:
        dots = np.einsum("ij,ij->i", np.repeat(vectors, row_sizes, axis=0), observed_fixed)
        weighted = sp.csr_matrix((extra.data * dots, rows.indices, rows.indptr), shape=rows.shape)
        return vectors @ gram + penalty[:, None] * vectors + weighted @ fixed

    target = sp.csr_matrix((1.0 + extra.data, rows.indices, rows.indptr), shape=rows.shape) @ fixed
    solution = start.copy()
    residual = target - apply(solution)
    direction = residual.copy()
    residual_norm = np.einsum("ij,ij->i", residual, residual)
    tiny = np.float32(1e-20)
    for _ in range(steps):
        applied = apply(direction)
        curvature = np.einsum("ij,ij->i", direction, applied)
        step = np.where(curvature > tiny, residual_norm / np.maximum(curvature, tiny), 0.0)[:, None]
        solution += step * direction
        residual -= step * applied
        new_norm = np.einsum("ij,ij->i", residual, residual)
        ratio = np.where(residual_norm > tiny, new_norm / np.maximum(residual_norm, tiny), 0.0)[:, None]
        direction = residual + ratio * direction
        residual_norm = new_norm
    return solution.astype(np.float32)
