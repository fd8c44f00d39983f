"""Top-K ranking metrics, shared by the DAG's evaluate stage and ``recsys bench quality``.

Definitions follow the Microsoft Recommenders MovieLens protocol (see README "Quality"):
for each user with at least one relevant item,

- Precision@K = hits in the top K / K
- Recall@K    = hits in the top K / number of relevant items
- nDCG@K      = DCG (gain 1 per hit, discount 1/log2(rank+1)) / ideal DCG over min(K, relevant)
- MAP@K       = sum over hits of precision at the hit's rank, divided by ALL relevant items
                (``map_denominator="all"``), or by min(K, relevant) as in implicit's
                ``mean_average_precision_at_k`` (``map_denominator="min_k"``).

Averages are over users with at least one relevant item.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class RankingMetrics:
    k: int
    users: int
    map: float
    ndcg: float
    precision: float
    recall: float
    coverage: float  # share of the catalogue that appears in anybody's top K

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def hit_matrix(recommended: np.ndarray, relevant: sp.csr_matrix) -> np.ndarray:
    """Boolean (users, K): whether ``recommended[u, r]`` is relevant for user u.

    ``recommended`` holds item indices with -1 as padding; row u belongs to row u of ``relevant``.
    Membership is tested on (user, item) pairs encoded as one int64, sorted once: O((nK + nnz) log).
    """
    relevant = relevant.tocsr()
    n_users, k = recommended.shape
    n_items = np.int64(relevant.shape[1])
    rows = np.repeat(np.arange(n_users, dtype=np.int64), np.diff(relevant.indptr))
    relevant_codes = rows * n_items + relevant.indices.astype(np.int64)
    candidate_codes = np.arange(n_users, dtype=np.int64)[:, None] * n_items + recommended.astype(np.int64)
    hits = np.isin(candidate_codes, relevant_codes)
    return hits & (recommended >= 0)


def ranking_metrics(
    recommended: np.ndarray,
    relevant: sp.csr_matrix,
    k: int,
    n_catalog_items: int | None = None,
    map_denominator: Literal["all", "min_k"] = "all",
) -> RankingMetrics:
    """Metrics of top-K lists (rows of ``recommended``) against a binary relevance matrix."""
    recommended = np.asarray(recommended)[:, :k]
    relevant = relevant.tocsr()
    if recommended.shape[0] != relevant.shape[0]:
        raise ValueError(
            f"recommended has {recommended.shape[0]} rows but relevant has {relevant.shape[0]}"
        )
    n_relevant = np.diff(relevant.indptr).astype(np.float64)
    evaluated = n_relevant > 0
    if not evaluated.any():
        raise ValueError("no user has a relevant item: nothing to evaluate")

    hits = hit_matrix(recommended, relevant)[evaluated].astype(np.float64)
    n_relevant = n_relevant[evaluated]
    width = hits.shape[1]
    ranks = np.arange(1, width + 1, dtype=np.float64)

    n_hits = hits.sum(axis=1)
    precision = n_hits / k
    recall = n_hits / n_relevant

    discounts = 1.0 / np.log2(ranks + 1.0)
    dcg = hits @ discounts
    ideal_discounts = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))])
    idcg = ideal_discounts[np.minimum(n_relevant, k).astype(np.int64)]
    ndcg = dcg / idcg

    precision_at_hit = np.cumsum(hits, axis=1) / ranks * hits
    denominator = n_relevant if map_denominator == "all" else np.minimum(n_relevant, k)
    average_precision = precision_at_hit.sum(axis=1) / denominator

    if n_catalog_items is None:
        n_catalog_items = relevant.shape[1]
    recommended_items = np.unique(recommended[recommended >= 0])
    return RankingMetrics(
        k=k,
        users=int(evaluated.sum()),
        map=float(average_precision.mean()),
        ndcg=float(ndcg.mean()),
        precision=float(precision.mean()),
        recall=float(recall.mean()),
        coverage=float(len(recommended_items) / max(n_catalog_items, 1)),
    )
