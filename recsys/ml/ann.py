"""Approximate top-N for large catalogues: an HNSW graph over the item factors (faiss, inner
product: ALS scores are dot products, not cosines) proposes each user's best-scored items, and
``rank_lists`` ranks those candidates exactly, with everything the exact path applies (the
user's own items, blocked items, boost/bury factors, MMR over the candidate pool; pins are
placed after, as always). A list differs from the exact one only where the graph missed one of
the user's best items. docs/benchmarks.md#approximate-top-n-for-large-catalogues has the
measured recall and speed.

Candidates per user: ``OVERFETCH`` × the pool ``rank_lists`` ranks (``CANDIDATES_PER_SLOT`` ×
n with MMR) plus the user's own items, which the graph returns too (ALS scores them high);
users with more than ``MAX_EXCLUDED`` own items are ranked exactly instead. Boost and bury
factors change which items score best, so a graph is built over the factors as they scale them
(``ItemIndexes``: one graph per distinct scaling, e.g. per segment with rules of its own).

faiss over hnswlib and usearch, measured on the same factors (docs/benchmarks.md): hnswlib
ships no wheels (it compiles on install); usearch reached the same recall at about the same
search rate but took longer to build; faiss filters blocked items inside the search.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from recsys.ml.top_n import _SLACK, CANDIDATES_PER_SLOT, ItemVectors, rank_lists

ANN_LIBRARY = "faiss"
HNSW_NEIGHBOURS = 32  # M: links per node; 16 lost recall@10 at the same search time
HNSW_BUILD_SEARCH = 100  # efConstruction
HNSW_SEARCH = 128  # efSearch at least this (and at least the candidates wanted)
OVERFETCH = 2  # candidates per pool entry
MAX_EXCLUDED = 256  # users with more own items than this are ranked exactly
USERS_PER_SEARCH = 16_384  # bounds the candidates held at once (users × candidates)


@dataclass(frozen=True)
class ItemIndex:
    """An HNSW graph over one model's item factors (inner product)."""

    index: Any
    n_items: int
    build_seconds: float

    @classmethod
    def build(cls, item_factors: np.ndarray, scale: np.ndarray | None = None) -> ItemIndex:
        """Over ``item_factors``, each row times its ``scale`` (boost and bury factors) if given."""
        import faiss

        factors = np.ascontiguousarray(item_factors, dtype=np.float32)
        if scale is not None:
            factors = factors * np.asarray(scale, np.float32)[:, None]
        start = time.perf_counter()
        index = faiss.IndexHNSWFlat(factors.shape[1], HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_BUILD_SEARCH
        index.add(factors)
        return cls(index, len(factors), time.perf_counter() - start)

    def search(self, user_factors: np.ndarray, count: int, blocked: np.ndarray | None = None) -> np.ndarray:
        """The ``count`` items of best raw score per user as the graph finds them (rows × count
        item indices, -1 padded), never a ``blocked`` one (bool per item)."""
        import faiss

        queries = np.ascontiguousarray(user_factors, dtype=np.float32).reshape(-1, self.index.d)
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(HNSW_SEARCH, count)
        if blocked is not None and blocked.any():
            bitmap = np.packbits(~np.asarray(blocked, dtype=bool), bitorder="little")
            selector = faiss.IDSelectorBitmap(self.n_items, faiss.swig_ptr(bitmap))
            params.sel = selector  # the selector reads the bitmap: both live until the search returns
        _, labels = self.index.search(queries, min(count, self.n_items), params=params)
        return labels.astype(np.int32)


class ItemIndexes:
    """The graphs of one model's items, built when first asked for, one per scaling."""

    def __init__(self, item_factors: np.ndarray) -> None:
        self.item_factors = item_factors
        self.built: dict[bytes, ItemIndex] = {}

    def for_scale(self, scale: np.ndarray | None) -> ItemIndex:
        key = b"" if scale is None else hashlib.sha256(np.asarray(scale, np.float32).tobytes()).digest()
        if key not in self.built:
            self.built[key] = ItemIndex.build(self.item_factors, scale)
        return self.built[key]


def candidate_count(n: int, diversity_lambda: float, excluded: int) -> int:
    """Candidates a user needs: ``OVERFETCH`` × the pool ``rank_lists`` ranks, the heap's slack,
    and room for ``excluded`` own items among them."""
    pool = n * (CANDIDATES_PER_SLOT if diversity_lambda > 0 else 1)
    return OVERFETCH * pool + _SLACK + excluded


def rank_lists_approximately(
    indexes: ItemIndexes,
    user_factors: np.ndarray,
    items: ItemVectors,
    n: int,
    *,
    exclude: sp.csr_matrix | None = None,
    blocked: np.ndarray | None = None,
    factors: np.ndarray | None = None,
    diversity_lambda: float = 0.0,
    first: int | None = None,
    progress: str | None = None,
) -> np.ndarray:
    """``rank_lists`` (same arguments, same result shape) on the candidates the graph of
    ``indexes`` for ``factors`` proposes."""
    user_factors = np.ascontiguousarray(user_factors, dtype=np.float32).reshape(-1, items.factors.shape[1])
    users = len(user_factors)
    n_items = len(items.factors)
    if exclude is None:
        exclude = sp.csr_matrix((users, n_items), dtype=np.float32)
    exact = {"exclude": exclude, "blocked": blocked, "factors": factors, "diversity_lambda": diversity_lambda,
             "first": first, "progress": progress}
    index = indexes.for_scale(factors)
    result = np.full((users, n), -1, dtype=np.int32)
    owned = np.diff(exclude.indptr)
    by_graph = np.flatnonzero(owned <= MAX_EXCLUDED)
    heavy = np.flatnonzero(owned > MAX_EXCLUDED)
    if len(heavy):
        result[heavy] = rank_lists(user_factors[heavy], items, n, **{**exact, "exclude": exclude[heavy]})
    for lo in range(0, len(by_graph), USERS_PER_SEARCH):
        rows = by_graph[lo : lo + USERS_PER_SEARCH]
        found = index.search(
            user_factors[rows], candidate_count(n, diversity_lambda, int(owned[rows].max())), blocked
        )
        result[rows] = rank_lists(
            user_factors[rows], items, n, **{**exact, "exclude": exclude[rows]}, candidates=found,
        )
    return result
