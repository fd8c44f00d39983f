"""Model-agnostic offline evaluation: top-K for every user with a relevant item, the user's own
items excluded, scored by ``recsys.ml.metrics`` (MAP over all relevant items). Used by the
MovieLens benchmark and the hyperparameter search; any factor model goes through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from recsys.ml.diversity import intra_list_diversity, novelty, recommend_diverse_top_n
from recsys.ml.families import Recommender
from recsys.ml.metrics import RankingMetrics, ranking_metrics
from recsys.ml.ranking import als_model, popularity_model, recommend_top_n
from recsys.ml.top_n import blocked_mask


@dataclass(frozen=True)
class Evaluation:
    metrics: RankingMetrics
    users: np.ndarray  # row indices that were evaluated (users with a test item)
    items: np.ndarray  # (users, k) recommended column indices, -1 padded
    scores: np.ndarray


def evaluate_factors(
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    exclude: sp.csr_matrix,
    relevant: sp.csr_matrix,
    k: int = 10,
    blocked_items: np.ndarray | None = None,
) -> Evaluation:
    """Top-k for every user with a relevant item, ``exclude`` items removed, scored by ``ranking_metrics``."""
    return _evaluate(als_model(user_factors, item_factors), exclude, relevant, k, blocked_items)


def evaluate_model(
    model: Recommender,
    user_items: sp.csr_matrix,
    exclude: sp.csr_matrix,
    relevant: sp.csr_matrix,
    k: int = 10,
    blocked_items: np.ndarray | None = None,
) -> Evaluation:
    """``evaluate_factors`` for a model of any family fitted on ``user_items`` (its lists from
    ``rank_lists``; scores: user vector · item vector of each listed item)."""
    relevant = relevant.tocsr()
    users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    items = model.recommend(users, user_items, k, exclude=exclude.tocsr()[users],
                            blocked=blocked_mask(model.n_items, blocked_items))
    vectors = model.user_vectors(users, user_items).astype(np.float64)
    listed = model.items.factors[np.maximum(items, 0)].astype(np.float64)
    scores = np.where(items >= 0, np.einsum("ud,ukd->uk", vectors, listed), -np.inf).astype(np.float32)
    metrics = ranking_metrics(items, relevant[users], k, map_denominator="all")
    return Evaluation(metrics, users, items, scores)


@dataclass(frozen=True)
class FittedRanker:
    """A fitted model of any family as ``diversity_tradeoff`` takes one: the vectors of every
    user of ``user_items`` and of every item (the product is the model's score)."""

    model: Recommender
    user_items: sp.csr_matrix

    @cached_property
    def user_factors(self) -> np.ndarray:
        return self.model.user_vectors(np.arange(self.user_items.shape[0]), self.user_items)

    @property
    def item_factors(self) -> np.ndarray:
        return self.model.items.factors


def evaluate_popularity(
    exclude: sp.csr_matrix, relevant: sp.csr_matrix, k: int = 10, blocked_items: np.ndarray | None = None
) -> Evaluation:
    """Most-rated items first (number of train users per item), the user's own items removed."""
    popularity = np.diff(exclude.tocsc().indptr).astype(np.float32)
    return _evaluate(popularity_model(popularity, exclude.shape[0]), exclude, relevant, k, blocked_items)


def _evaluate(
    model, exclude: sp.csr_matrix, relevant: sp.csr_matrix, k: int, blocked_items: np.ndarray | None
) -> Evaluation:
    relevant = relevant.tocsr()
    users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    items, scores = recommend_top_n(model, users, exclude.tocsr(), k, blocked_items=blocked_items)
    metrics = ranking_metrics(items, relevant[users], k, map_denominator="all")
    return Evaluation(metrics, users, items, scores)


def metric_summary(metrics: RankingMetrics) -> dict[str, float]:
    """The four protocol metrics under the names the benchmark reports."""
    k = metrics.k
    return {
        "map": metrics.map,
        f"ndcg_at_{k}": metrics.ndcg,
        f"precision_at_{k}": metrics.precision,
        f"recall_at_{k}": metrics.recall,
    }


def diversity_tradeoff(
    model,
    exclude: sp.csr_matrix,
    relevant: sp.csr_matrix,
    lambdas: list[float],
    genre_vectors: np.ndarray | None = None,
    k: int = 10,
    blocked_items: np.ndarray | None = None,
) -> list[dict[str, float | None]]:
    """Accuracy and beyond-accuracy metrics of the top-k lists publish would make at each λ
    (``recommend_diverse_top_n``: MMR on the cosine of the model's item factors), one row per λ.

    Coverage: share of the catalogue in some list; intra-list diversity: on ``genre_vectors``
    (unit rows; None: not measured); novelty: mean −log2 of the share of ``exclude``'s users who
    have each recommended item.
    """
    relevant, exclude = relevant.tocsr(), exclude.tocsr()
    users = np.flatnonzero(np.diff(relevant.indptr) > 0)
    item_users = np.diff(exclude.tocsc().indptr)
    rows = []
    for diversity_lambda in lambdas:
        lists = recommend_diverse_top_n(model, users, exclude, k, diversity_lambda, blocked_items)
        metrics = ranking_metrics(lists, relevant[users], k, map_denominator="all")
        rows.append({
            "lambda": diversity_lambda,
            **metric_summary(metrics),
            "coverage": metrics.coverage,
            "intra_list_diversity": None if genre_vectors is None else intra_list_diversity(lists, genre_vectors),
            "novelty": novelty(lists, item_users, exclude.shape[0]),
        })
    return rows
