"""Diversity re-ranking (MMR) and the beyond-accuracy metrics it is measured by.

Re-ranking is model-agnostic: it takes a ranked candidate list per user (longer than the list to
publish, e.g. ``CANDIDATES_PER_SLOT`` × top-N from ``recommend_top_n``) and item vectors whose
cosine is the similarity of two items — item factors, or one-hot categories / multi-hot genres.

Maximal Marginal Relevance (Carbonell & Goldstein 1998), greedily, one slot at a time:

    next = argmax over remaining candidates c of (1 − λ) · score(c) / top score − λ · max cos(c, chosen)

The score is divided by the user's top candidate score, so λ means the same whatever the model's
score scale; the first pick is always the top-scored item. λ = 0 keeps the candidate order.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from recsys.ml.ranking import recommend_top_n

# candidates re-ranked per published slot: a pool of 4 × top_n leaves room to diversify while
# every pick stays among the user's best-scored items
CANDIDATES_PER_SLOT = 4
_BATCH_USERS = 2_000  # users re-ranked at once: bounds the (users, candidates, dims) gather


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero: similar to nothing), so a dot is a cosine."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


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
    (default: each row's first candidate).
    """
    if not 0 <= diversity_lambda <= 1:
        raise ValueError(f"diversity_lambda must be in [0, 1], got {diversity_lambda!r}")
    candidates = np.asarray(candidates)
    if diversity_lambda == 0 or candidates.shape[1] <= 1:
        return _padded(candidates[:, :n], n)
    result = np.full((len(candidates), n), -1, dtype=candidates.dtype)
    for start in range(0, len(candidates), _BATCH_USERS):
        part = slice(start, start + _BATCH_USERS)
        result[part] = _mmr_batch(
            candidates[part], np.asarray(scores[part], dtype=np.float64), n, diversity_lambda, item_vectors,
            None if chosen is None else np.asarray(chosen)[part],
            None if top_scores is None else np.asarray(top_scores, dtype=np.float64)[part, None],
        )
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
    """``recommend_top_n``'s lists re-ranked by MMR on the cosine of the model's item factors;
    λ = 0 is exactly ``recommend_top_n`` (no larger pool is even scored)."""
    if diversity_lambda == 0:
        return recommend_top_n(model, users, exclude, n, blocked_items, progress=progress)[0]
    pool, scores = recommend_top_n(model, users, exclude, n * CANDIDATES_PER_SLOT, blocked_items, progress=progress)
    return mmr_rerank(pool, scores, n, diversity_lambda, unit_rows(model.item_factors))


def _padded(lists: np.ndarray, n: int) -> np.ndarray:
    if lists.shape[1] >= n:
        return lists.copy()
    return np.pad(lists, ((0, 0), (0, n - lists.shape[1])), constant_values=-1)


def _mmr_batch(
    candidates: np.ndarray,
    scores: np.ndarray,
    n: int,
    diversity_lambda: float,
    item_vectors: np.ndarray,
    chosen: np.ndarray | None,
    top: np.ndarray | None,
) -> np.ndarray:
    users, width = candidates.shape
    valid = candidates >= 0
    top = scores[:, :1] if top is None else top
    # relative to the top score; a non-positive top (nothing the model likes) keeps raw scores
    relevance = np.where(top > 0, scores / np.where(top > 0, top, 1.0), scores)
    relevance = np.where(valid, relevance, 0.0)
    vectors = item_vectors[np.where(valid, candidates, 0)]  # (users, width, dims)
    rows = np.arange(users)
    max_similarity = np.zeros((users, width))
    has_chosen = np.zeros(users, dtype=bool)
    if chosen is not None and chosen.size:
        chosen_similarity = np.einsum("uwd,umd->uwm", vectors, item_vectors[np.where(chosen >= 0, chosen, 0)])
        chosen_similarity[np.broadcast_to((chosen < 0)[:, None, :], chosen_similarity.shape)] = -np.inf
        has_chosen = (chosen >= 0).any(axis=1)
        max_similarity[has_chosen] = chosen_similarity[has_chosen].max(axis=2)
    open_slot = valid.copy()
    picks = np.full((users, n), -1, dtype=candidates.dtype)
    for slot in range(min(n, width)):
        value = (1 - diversity_lambda) * relevance - diversity_lambda * max_similarity
        value[~open_slot] = -np.inf
        best = np.argmax(value, axis=1)  # ties: the earlier candidate, i.e. the better-scored one
        chosen = open_slot[rows, best]
        picks[chosen, slot] = candidates[rows[chosen], best[chosen]]
        open_slot[rows, best] = False
        similarity = np.einsum("uwd,ud->uw", vectors, vectors[rows, best])
        # a row's first pick has no predecessor: before it the penalty is 0, after it the max so far
        first = ~has_chosen if slot == 0 else np.zeros(users, dtype=bool)
        max_similarity = np.where(first[:, None], similarity, np.maximum(max_similarity, similarity))
    return picks


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
