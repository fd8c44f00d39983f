"""How much one interaction counts: event-type weights, value, time decay, confidence scaling."""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp

ConfidenceScaling = Literal["none", "log", "bm25"]
BM25_FLOOR = 1e-3
BM25_K1, BM25_B = 1.2, 0.75  # the matrix stage's and the API's fold-in's


def interaction_weights(
    event_types: np.ndarray,
    values: np.ndarray,
    ages_days: np.ndarray,
    event_weights: dict[str, float],
    half_life_days: float,
) -> np.ndarray:
    """weight = event_weight[type] * value * 0.5 ** (age / half_life); value NULL counts as 1."""
    type_weight = np.zeros(len(event_types), dtype=np.float64)
    for event_type, weight in event_weights.items():
        type_weight[event_types == event_type] = weight
    return decayed_weights(type_weight, values, ages_days, half_life_days)


def decayed_weights(
    type_weights: np.ndarray, values: np.ndarray, ages_days: np.ndarray, half_life_days: float
) -> np.ndarray:
    """``interaction_weights`` once each row's event-type weight is known (NaN value counts as 1)."""
    value = np.where(np.isnan(values), 1.0, values)
    weights = type_weights * value
    if half_life_days > 0:
        weights = weights * np.power(0.5, np.clip(ages_days, 0, None) / half_life_days)
    return weights.astype(np.float32)


def scale_confidence(
    user_items: sp.csr_matrix, scheme: ConfidenceScaling = "none", bm25_k1: float = BM25_K1, bm25_b: float = BM25_B
) -> sp.csr_matrix:
    """Rescale summed weights before ALS turns them into confidence 1 + alpha * w.

    ``log`` damps heavy repeat users (log1p); ``bm25`` uses implicit's BM25 weighting, which also
    discounts very popular items.
    """
    if scheme == "none":
        return user_items
    if scheme == "log":
        scaled = user_items.astype(np.float32)  # a copy: the caller's matrix stays as it was
        np.log1p(scaled.data, out=scaled.data)
        return scaled
    if scheme == "bm25":
        from implicit.nearest_neighbours import bm25_weight

        scaled = bm25_weight(user_items, K1=bm25_k1, B=bm25_b).tocsr().astype(np.float32)
        # implicit's idf is log(N) - log1p(df): zero or negative for an item nearly every user has,
        # which ALS would read as "not liked" or as negative feedback. Keep every interaction positive.
        scaled.data = np.maximum(scaled.data, BM25_FLOOR)
        return scaled
    raise ValueError(f"unknown confidence scaling {scheme!r}; use none, log or bm25")
