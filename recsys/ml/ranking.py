"""Top-N lists from factor models, shared by evaluate, publish and the benchmarks.

The popularity baseline is a rank-1 factor model (every user 1, every item its popularity), so the
baseline and ALS go through exactly the same ranking and filtering code.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm


def als_model(user_factors: np.ndarray, item_factors: np.ndarray):
    """An implicit ALS model around saved factors, ready for ``recommend`` / ``similar_items``."""
    from implicit.cpu.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(factors=item_factors.shape[1], random_state=0)
    model.user_factors = np.ascontiguousarray(user_factors, dtype=np.float32)
    model.item_factors = np.ascontiguousarray(item_factors, dtype=np.float32)
    return model


def popularity_model(item_popularity: np.ndarray, n_users: int):
    return als_model(
        np.ones((n_users, 1), dtype=np.float32),
        np.asarray(item_popularity, dtype=np.float32).reshape(-1, 1),
    )


def _filtered(scores: np.ndarray) -> np.ndarray:
    """Slots implicit filled with a filtered item: it scores them float32-min (or -inf/NaN)."""
    return ~(scores > np.finfo(np.float32).min)


def _batches(n: int, size: int) -> Iterable[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def recommend_top_n(
    model,
    users: np.ndarray,
    exclude: sp.csr_matrix,
    n: int,
    blocked_items: np.ndarray | None = None,
    batch_size: int = 10_000,
    progress: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``n`` item indices and scores for ``users``; excluded and blocked items never appear.

    Rows shorter than ``n`` (a user who already has nearly everything) are padded with -1.
    """
    users = np.asarray(users, dtype=np.int32)
    ids = np.full((len(users), n), -1, dtype=np.int32)
    scores = np.full((len(users), n), -np.inf, dtype=np.float32)
    blocked = None if blocked_items is None or len(blocked_items) == 0 else np.asarray(blocked_items)
    for part in tqdm(
        list(_batches(len(users), batch_size)), desc=progress, disable=progress is None, unit="batch"
    ):
        batch_users = users[part]
        batch_ids, batch_scores = model.recommend(
            batch_users,
            exclude[batch_users],
            N=n,
            filter_already_liked_items=True,
            filter_items=blocked,
        )
        batch_ids = np.asarray(batch_ids).reshape(len(batch_users), -1)
        batch_scores = np.asarray(batch_scores).reshape(len(batch_users), -1)
        invalid = _filtered(batch_scores)
        batch_ids = np.where(invalid, -1, batch_ids)
        width = batch_ids.shape[1]
        ids[part, :width] = batch_ids
        scores[part, :width] = batch_scores
    return ids, scores


def top_buys_order(items):
    """Active products, most distinct buyers first (ties: more distinct users, then id): the order
    of the published top buys and of the API's popular fallback. ``items``: the matrix's items table
    as a DataFrame (``id``, ``active``, ``buyers``, ``popularity``)."""
    return items[items["active"]].sort_values(["buyers", "popularity", "id"], ascending=[False, False, True])
