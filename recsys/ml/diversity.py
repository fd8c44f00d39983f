"""Diversity re-ranking (MMR) and the beyond-accuracy metrics it is measured by.

Re-ranking is model-agnostic: it takes a ranked candidate list per user (longer than the list to
publish: ``rank_lists`` re-ranks its best ``CANDIDATES_PER_SLOT`` × top-N) and item vectors whose
cosine is the similarity of two items — item factors, or one-hot categories / multi-hot genres.

Maximal Marginal Relevance (Carbonell & Goldstein 1998), greedily, one slot at a time:

    next = argmax over remaining candidates c of (1 − λ) · score(c) / top score − λ · max cos(c, chosen)

The score is divided by the user's top candidate score, so λ means the same whatever the model's
score scale; the first pick is always the top-scored item. λ = 0 keeps the candidate order.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from recsys.ml.top_n import ItemVectors, blocked_mask, mmr_row, rank_lists, unit_rows

__all__ = ["unit_rows"]  # re-exported: where diversity's users look for it


def category_vectors(categories) -> np.ndarray:
    """One-hot rows of single categories (None: a zero row): cosine 1 within a category, else 0."""
    categories = np.asarray(categories, dtype=object)
    known = sorted({c for c in categories if c is not None})
    column = {c: j for j, c in enumerate(known)}
    vectors = np.zeros((len(categories), max(len(known), 1)), dtype=np.float32)
    for row, category in enumerate(categories):
        if category is not None:
            vectors[row, column[category]] = 1.0
    return vectors


def mmr_rerank(
    candidates: np.ndarray,
    scores: np.ndarray,
    n: int,
    diversity_lambda: float,
    item_vectors: np.ndarray,
    chosen: np.ndarray | None = None,
    top_scores: np.ndarray | None = None,
) -> np.ndarray:
    """The first ``n`` picks of MMR per row of ``candidates`` (item indices, best first, -1 padded).

    ``item_vectors``: one row per item, unit length (``unit_rows``). Rows with fewer than ``n``
    valid candidates are padded with -1. ``diversity_lambda`` 0 returns the first ``n`` candidates.
    To continue a list: ``chosen`` (rows × m, -1 padded) are its picks so far, penalising from the
    first slot on, and ``top_scores`` (one per row) the top score relevance is relative to
    (default: each row's first candidate). The same re-ranking ``rank_lists`` applies to its pool.
    """
    if not 0 <= diversity_lambda <= 1:
        raise ValueError(f"diversity_lambda must be in [0, 1], got {diversity_lambda!r}")
    candidates = np.asarray(candidates)
    if diversity_lambda == 0 or candidates.shape[1] <= 1:
        return _padded(candidates[:, :n], n)
    result = np.full((len(candidates), n), -1, dtype=candidates.dtype)
    scores = np.asarray(scores, dtype=np.float64)
    vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
    picks = np.empty(n, dtype=np.int32)
    for row in range(len(candidates)):
        valid = candidates[row] >= 0
        before = np.empty(0, np.int32) if chosen is None else np.asarray(chosen[row], dtype=np.int32)
        top = scores[row, 0] if top_scores is None else float(np.asarray(top_scores)[row])
        mmr_row(candidates[row][valid].astype(np.int32), scores[row][valid], picks, float(diversity_lambda), vectors,
                before, top)
        result[row] = picks
    return result


def recommend_diverse_top_n(
    model,
    users: np.ndarray,
    exclude: sp.csr_matrix,
    n: int,
    diversity_lambda: float,
    blocked_items: np.ndarray | None = None,
    progress: str | None = None,
) -> np.ndarray:
    """The top-``n`` lists publish makes (``rank_lists``) for ``users`` of a factor ``model``:
    ``exclude``'s row items and ``blocked_items`` never listed, MMR on the cosine of the item
    factors when ``diversity_lambda`` > 0 (λ = 0: the best-scored ``n``)."""
    users = np.asarray(users, dtype=np.int64)
    return rank_lists(
        model.user_factors[users], ItemVectors.of(model.item_factors), n, exclude=exclude.tocsr()[users],
        blocked=blocked_mask(model.item_factors.shape[0], blocked_items), diversity_lambda=diversity_lambda, progress=progress,
    )


def _padded(lists: np.ndarray, n: int) -> np.ndarray:
    if lists.shape[1] >= n:
        return lists.copy()
    return np.pad(lists, ((0, 0), (0, n - lists.shape[1])), constant_values=-1)


def intra_list_diversity(lists: np.ndarray, item_vectors: np.ndarray) -> float:
    """Mean over lists (with ≥ 2 items) of the mean pairwise dissimilarity 1 − cos(i, j) of their
    items, ``item_vectors`` unit rows (``unit_rows``); -1 entries are padding."""
    per_list = []
    for row in np.asarray(lists):
        items = row[row >= 0]
        if len(items) < 2:
            continue
        vectors = item_vectors[items]
        similarity = vectors @ vectors.T
        pairs = np.triu_indices(len(items), k=1)
        per_list.append(float(np.mean(1.0 - similarity[pairs])))
    return float(np.mean(per_list)) if per_list else 0.0


def novelty(lists: np.ndarray, item_users: np.ndarray, n_users: int) -> float:
    """Mean self-information −log2(p(i)) over every recommended item of every list, where
    p(i) = ``item_users[i]`` / ``n_users`` is the share of users who have item i (an item nobody
    has cannot be scored and is left out)."""
    lists = np.asarray(lists)
    items = lists[lists >= 0]
    counts = np.asarray(item_users, dtype=np.float64)[items]
    counts = counts[counts > 0]
    if len(counts) == 0:
        return 0.0
    return float(np.mean(-np.log2(counts / n_users)))
