"""Why ALS scores an item for a user: the share of each of the user's past items in that score.

The ALS user vector solves x_u = W_u Yᵀ C_u p_u with W_u = (YᵀY + Yᵀ(C_u − I)Y + λI)⁻¹, so a
score y_iᵀ x_u is a sum over the user's items j of (y_iᵀ W_u y_j) · c_uj (Hu, Koren & Volinsky
2008, section 5). This is implicit's ``AlternatingLeastSquares.explain`` (confidence = alpha ×
the row's value, negative values only in W_u), computed for several items with one Cholesky
factorisation and without implicit's per-item Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class Explanation:
    item: int
    score: float  # the sum of every contribution: the item's score for this user's row
    contributions: list[tuple[int, float]]  # (past item, its part of the score), largest first


def explain_items(
    item_factors: np.ndarray,
    user_row: sp.csr_matrix,
    items: list[int],
    regularization: float,
    alpha: float,
    n: int = 3,
) -> list[Explanation]:
    """For each of ``items``, its score from ``user_row`` (1 × items, the weights ALS was fitted on)
    and the ``n`` past items that contribute most to it."""
    import scipy.linalg  # 10 MiB of RSS every stage process would hold through the families

    factors = np.asarray(item_factors, dtype=np.float64)
    row = user_row.tocsr()
    past, confidence = row.indices, alpha * row.data.astype(np.float64)
    past_factors = factors[past]
    # W_u⁻¹ = YᵀY + λI + Σ_j (|c_uj| − 1) y_j y_jᵀ (implicit's user_linear_equation)
    inverse_weights = factors.T @ factors + regularization * np.eye(factors.shape[1])
    inverse_weights += past_factors.T @ ((np.abs(confidence) - 1)[:, None] * past_factors)
    cholesky = scipy.linalg.cho_factor(inverse_weights)
    weighted = scipy.linalg.cho_solve(cholesky, factors[items].T)  # W_u y_i, one column per item
    # negative confidences shape W_u but are no evidence for an item (implicit skips them too)
    contributions = (past_factors @ weighted) * np.where(confidence >= 0, confidence, 0.0)[:, None]
    explanations = []
    for column, item in enumerate(items):
        scores = contributions[:, column]
        kept = np.flatnonzero(confidence >= 0)
        top = kept[np.argsort(-scores[kept], kind="stable")[:n]]
        explanations.append(Explanation(
            item=int(item), score=float(scores.sum()),
            contributions=[(int(past[j]), float(scores[j])) for j in top],
        ))
    return explanations
