"""Ranking on request (CPU work: it runs in the service's thread pool): a user's recorded events
weighed as the matrix stage would, folded into the live item factors, and ranked.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import scipy.sparse as sp

from recsys.ml.top_n import rank_lists, similar_items
from recsys.ml.weighting import BM25_FLOOR, BM25_K1, interaction_weights, scale_confidence
from recsys.serving.live_model import LiveModel

log = logging.getLogger(__name__)

SECONDS_PER_DAY = 86_400.0



@dataclass(frozen=True)
class UserEvents:
    """A user's recorded interactions as the matrix stage would weigh them."""

    row: sp.csr_matrix  # 1 x items, summed and scaled weights
    owned: np.ndarray  # item indices of exclude_event_types and negative feedback: never recommended again
    negative_products: frozenset[str] = frozenset()  # product ids of negative feedback, known to the model or not


def _bm25_row(live: LiveModel, row: sp.csr_matrix) -> sp.csr_matrix:
    """BM25 for one user with the window's idf. The user's length norm is taken as average
    (B term 1): the window's raw row sums are not kept, so this approximates the matrix stage."""
    idf = np.log(live.exclude.shape[0]) - np.log1p(live.document_frequency[row.indices])
    scaled = row.copy()
    scaled.data = np.maximum(row.data * (BM25_K1 + 1) / (BM25_K1 + row.data) * idf, BM25_FLOOR).astype(np.float32)
    return scaled


def weigh_events(live: LiveModel, events: list[tuple[str, str, float | None, float]], now: datetime) -> UserEvents:
    """(product_id, event_type, value, epoch seconds) rows -> the user's weighted row.

    The same rules as extract + matrix: unknown products and event types count for nothing, a
    negative, non-finite or absurd (> max_value) value is a data error and is dropped. Negative
    feedback blocks its product and cancels every other event of the user on it.
    """
    params = live.params
    negative_products = frozenset(product for product, event_type, _, _ in events if event_type in params.negative_event_types)
    blocked = np.array(sorted(live.item_index[p] for p in negative_products if p in live.item_index), dtype=np.int64)
    kept = [
        (live.item_index[product], event_type, math.nan if value is None else value, at)
        for product, event_type, value, at in events
        if product in live.item_index
        and product not in negative_products
        and event_type in params.event_weights
        and (value is None or (math.isfinite(value) and 0 <= value <= params.max_value))
    ]
    shape = (1, len(live.item_ids))
    if not kept:
        return UserEvents(sp.csr_matrix(shape, dtype=np.float32), blocked, negative_products)
    items, types, values, at = (np.asarray(column) for column in zip(*kept, strict=True))
    ages_days = (now.timestamp() - at.astype(np.float64)) / SECONDS_PER_DAY
    weights = interaction_weights(types.astype(str), values.astype(np.float64), ages_days, params.event_weights, params.half_life_days)
    row = sp.csr_matrix((weights, (np.zeros(len(items), dtype=np.int32), items)), shape=shape, dtype=np.float32)
    row.sum_duplicates()
    row.eliminate_zeros()
    if params.confidence_scaling == "bm25":
        row = _bm25_row(live, row)
    else:
        row = scale_confidence(row, params.confidence_scaling)
    owned = np.union1d(items[np.isin(types, list(params.exclude_event_types))], blocked).astype(np.int64)
    return UserEvents(row.astype(np.float32), owned, negative_products)


def fold_in_vector(live: LiveModel, events: UserEvents) -> np.ndarray | None:
    """The user's factors solved against the live item factors (implicit's recalculate_user); for
    the item-item families, the weighted row itself. None when the live family cannot fold in a
    user (BPR): the caller serves the top buys instead."""
    if live.model is None:
        return live.recommender.fold_in(events.row)
    return np.asarray(live.model.recalculate_user(0, events.row), dtype=np.float32)


def rank_items(
    live: LiveModel,
    vector: np.ndarray,
    blocked: Iterable[int],
    category: str | None,
    count: int,
    diversity_lambda: float = 0.0,
    head: list[int] | None = None,
    factors: np.ndarray | None = None,
    top_n: int | None = None,
) -> list[int]:
    """Top ``count`` active items by score, never a blocked one, optionally within a category.
    ``factors``: per item, what boost and bury rules multiply its score by.

    The ranking publish does (``rank_lists``): with ``diversity_lambda`` > 0, MMR re-ranks. A
    list that starts with ``head`` (the published list, filtered) continues it: further picks
    from the best ``CANDIDATES_PER_SLOT`` × ``count``, penalised by their similarity to the head
    too. Without a head, the first ``top_n`` picks (the user's variant's; default the version's)
    are the ones publish makes, and later ones continue from the larger pool.
    """
    head = list(head or []) if diversity_lambda > 0 else []
    lists = rank_lists(
        vector, live.items, count, blocked=~_allowed(live, blocked, category), factors=factors,
        diversity_lambda=diversity_lambda, first=min(count, live.params.top_n if top_n is None else top_n),
        head=np.asarray([head], dtype=np.int32) if head else None,
    )
    return [int(i) for i in lists[0] if i >= 0]


def rank_popular(live: LiveModel, blocked: Iterable[int], category: str | None, count: int) -> list[int]:
    allowed = _allowed(live, blocked, category)
    return [int(i) for i in live.popular[allowed[live.popular]][:count]]


def _allowed(live: LiveModel, blocked: Iterable[int], category: str | None) -> np.ndarray:
    allowed = live.active.copy()
    blocked = np.fromiter(blocked, dtype=np.int64)
    allowed[blocked] = False
    if category is not None:
        allowed &= live.category == category
    return allowed


def similar_to(live: LiveModel, item: int, count: int, kept_out: np.ndarray | None = None) -> list[int]:
    """``kept_out``: per item, excluded by a rule (besides the version's inactive products)."""
    blocked = ~live.active if kept_out is None else ~live.active | kept_out
    # the family's own similarity, as publish lists it (ALS: the cosine of the factors)
    if live.recommender is None:
        row = similar_items(live.items, np.asarray([item]), count, blocked)[0]
    else:
        row = live.recommender.similar_items(np.asarray([item]), count, blocked)[0]
    return [int(i) for i in row[row >= 0]]
