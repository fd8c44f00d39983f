"""Bought together: item-item co-purchase statistics over baskets, each product's complements,
filled with item similarity for products bought together too rarely, and a cart's merged list.

A *basket* is one user's purchase-like events (``basket_event_types``) on one UTC day: the shop
schema has no session or order id, and a day is the closest stand-in for one shopping trip.

Over the ``N`` baskets of a window, with ``n(a)`` the baskets holding product ``a`` and
``s(a, b)`` the baskets holding both ``a`` and ``b`` (the *support* of the pair):

- confidence ``P(b | a) = s(a, b) / n(a)``
- lift ``= s(a, b) * N / (n(a) * n(b))``: how much more often the pair is bought together than
  if the two were bought independently
- **score** (the complements' order) ``= s(a, b) - n(a) * n(b) / N``: co-purchases beyond those
  expected by chance, i.e. ``n(a) * (P(b | a) - P(b))``. It is positive exactly when lift > 1, and
  grows with both lift and support, so a pair seen twice with lift 50 does not outrank one seen
  200 times with lift 3 (plain lift would), while a product every basket holds gains nothing
  from merely being frequent (plain confidence would rank it first everywhere).

Complements are the pairs with support >= ``min_support`` and lift > 1. A product with fewer than
``n`` of them has its remaining slots filled with its most similar products (ALS item factors), so
every active product has a list. Everything is sparse algebra on the baskets x items incidence
matrix ``B`` (co-occurrence ``BᵀB``); nothing loops over rows in Python.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TypeVar

import numpy as np
import scipy.sparse as sp

T = TypeVar("T")


def basket_keys(users: np.ndarray, days: np.ndarray) -> np.ndarray:
    """One int64 key per (user index, UTC day number since 1970) pair: rows with the same key share
    a basket. Keys of separately computed parts agree, so they may be built batch by batch."""
    return np.asarray(users, dtype=np.int64) * (1 << 32) + np.asarray(days, dtype=np.int64)


def basket_matrix(keys: np.ndarray, items: np.ndarray, n_items: int) -> sp.csr_matrix:
    """Baskets x items, 1 where the basket holds the item (bought twice the same day counts once),
    from one row per purchase-like event: its basket key and item index."""
    _, basket = np.unique(np.asarray(keys), return_inverse=True)
    n_baskets = int(basket.max()) + 1 if len(basket) else 0
    matrix = sp.csr_matrix(
        (np.ones(len(basket), np.float32), (basket, np.asarray(items, dtype=np.int32))),
        shape=(n_baskets, n_items),
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1
    return matrix


@dataclass(frozen=True)
class CoPurchase:
    """Pair statistics of a set of baskets (items x items, diagonal left out)."""

    support: sp.csr_matrix  # s(a, b): baskets holding both
    item_baskets: np.ndarray  # n(a): baskets holding a
    baskets: int  # N

    def _per_pair(self, values: np.ndarray) -> sp.csr_matrix:
        # copies of the structure: callers may prune the result in place
        return sp.csr_matrix(
            (values, self.support.indices.copy(), self.support.indptr.copy()), shape=self.support.shape
        )

    def _pair_counts(self) -> tuple[np.ndarray, np.ndarray]:
        rows = np.repeat(np.arange(self.support.shape[0]), np.diff(self.support.indptr))
        return self.item_baskets[rows].astype(np.float64), self.item_baskets[self.support.indices].astype(np.float64)

    def confidence(self) -> sp.csr_matrix:
        """P(b | a) in row a, column b."""
        n_a, _ = self._pair_counts()
        return self._per_pair(self.support.data / n_a)

    def lift(self) -> sp.csr_matrix:
        n_a, n_b = self._pair_counts()
        return self._per_pair(self.support.data * self.baskets / (n_a * n_b))

    def score(self) -> sp.csr_matrix:
        """Co-purchases beyond chance, s(a, b) - n(a) n(b) / N (module docstring)."""
        n_a, n_b = self._pair_counts()
        return self._per_pair(self.support.data - n_a * n_b / self.baskets)


def co_purchase(baskets: sp.csr_matrix) -> CoPurchase:
    """Pair statistics of the baskets x items incidence matrix."""
    incidence = baskets.tocsr().astype(np.float64)
    support = (incidence.T @ incidence).tocsr()
    support.setdiag(0)
    support.eliminate_zeros()
    support.sort_indices()
    return CoPurchase(
        support=support,
        item_baskets=np.asarray(incidence.sum(axis=0)).ravel(),
        baskets=baskets.shape[0],
    )


def top_per_row(scores: sp.csr_matrix, n: int) -> np.ndarray:
    """Column indices of each row's ``n`` largest stored values (ties: lower column first), padded
    with -1: one sort over all stored values instead of a loop over rows."""
    scores = scores.tocsr()
    rows = np.repeat(np.arange(scores.shape[0]), np.diff(scores.indptr))
    order = np.lexsort((scores.indices, -scores.data, rows))
    rank = np.arange(len(order)) - scores.indptr[rows[order]]
    keep = rank < n
    result = np.full((scores.shape[0], n), -1, dtype=np.int32)
    result[rows[order][keep], rank[keep]] = scores.indices[order][keep]
    return result


def complements(
    stats: CoPurchase, items: np.ndarray, n: int, min_support: int, blocked_items: np.ndarray | None = None
) -> np.ndarray:
    """(len(items), n): each item's complements best first by score, -1 padded. Only pairs with
    support >= ``min_support`` and lift > 1 (score > 0); blocked items never appear."""
    score = stats.score()
    keep = (stats.support.data >= min_support) & (score.data > 0)
    if blocked_items is not None and len(blocked_items):
        keep &= ~np.isin(score.indices, blocked_items)
    score.data = np.where(keep, score.data, 0)
    score.eliminate_zeros()
    return top_per_row(score[np.asarray(items, dtype=np.int32)], n)


def fill_from(primary: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Each row of ``primary`` (item indices, -1 padded), its empty slots filled with the row's
    ``fallback`` entries it does not hold yet, in order; the width of ``primary``."""
    width = primary.shape[1]
    candidates = np.concatenate([primary, fallback], axis=1)
    # a repeat of an earlier entry of its row becomes -1 (a stable sort keeps the earliest first)
    order = np.argsort(candidates, axis=1, kind="stable")
    ordered = np.take_along_axis(candidates, order, axis=1)
    repeat = np.zeros_like(candidates, dtype=bool)
    repeat[:, 1:] = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    np.put_along_axis(candidates, order, np.where(repeat, -1, ordered), axis=1)
    # the entries left, moved to the front in their order
    packed = np.argsort(candidates < 0, axis=1, kind="stable")
    return np.take_along_axis(candidates, packed, axis=1)[:, :width]


def bought_together(
    baskets: sp.csr_matrix,
    items: np.ndarray,
    similar: np.ndarray,
    n: int,
    min_support: int,
    blocked_items: np.ndarray | None = None,
) -> np.ndarray:
    """(len(items), n) item indices, -1 padded: each item's complements, then its ``similar``
    items (rows aligned with ``items``, best first) in the slots complements leave empty."""
    found = complements(co_purchase(baskets), items, n, min_support, blocked_items)
    return fill_from(found, similar)


def vote_ranked_lists(
    voters: Sequence[tuple[str, float, Sequence[Sequence[T]]]], n: int, excluded: set[T] | frozenset[T] = frozenset()
) -> tuple[list[T], list[str]]:
    """The ``n`` best entries of several sources' ranked lists in one vote: an entry at position
    ``r`` (1-based) of a list of a source of weight ``w`` gets ``w / r``, and an entry's votes from
    all lists of all sources add up. Ties keep the order of first appearance (sources in the order
    given); entries in ``excluded`` never appear. Returns the entries and the sources that voted
    for them, in list order: for each entry in turn, its voters largest vote first (ties: the
    earlier source), each source named once."""
    # An API hot path, where each entry's turn of a Python loop costs ~1,000 instructions: the
    # votes w / r are computed once per position, the excluded entries dropped once at the end.
    per_position = [(name, _votes_at(weight, max(map(len, lists), default=0)), lists) for name, weight, lists in voters]
    votes: dict[T, float] = {}
    get = votes.get
    for _, vote_at, lists in per_position:
        for ranked in lists:
            for entry, vote in zip(ranked, vote_at, strict=False):  # vote_at fits the longest list
                votes[entry] = get(entry, 0.0) + vote
    for entry in excluded:
        votes.pop(entry, None)
    # sorted is stable with reverse=True too: ties keep the dict's order, that of first appearance
    picked = sorted(votes, key=get, reverse=True)[:n]
    # who voted for the picked entries, worked out entry by entry until every source is named
    # (mostly by the first): list searches in C rather than another pass over every entry
    used: list[str] = []
    for entry in picked:
        if len(used) == len(voters):
            break
        share: dict[str, float] = {}
        for name, vote_at, lists in per_position:
            for ranked in lists:
                if entry in ranked:
                    first = ranked.index(entry)
                    share[name] = share.get(name, 0.0) + vote_at[first]
                    if ranked.count(entry) > 1:  # not in published lists (distinct), but allowed
                        for position in range(first + 1, len(ranked)):
                            if ranked[position] == entry:
                                share[name] += vote_at[position]
        for name in sorted(share, key=share.__getitem__, reverse=True):
            if name not in used:
                used.append(name)
    return picked, used


@cache
def _votes_at(weight: float, positions: int) -> tuple[float, ...]:
    """``weight / r`` for r = 1..positions: the same few tuples on every request, made once."""
    return tuple(weight / position for position in range(1, positions + 1))


def merge_ranked_lists(lists: Iterable[Sequence[T]], n: int, excluded: set[T] | frozenset[T] = frozenset()) -> list[T]:
    """The ``n`` best entries of several ranked lists (a cart's products' lists) taken as a whole:
    an entry at position ``r`` (1-based) of a list gets the vote ``1 / r``, and an entry's votes
    from all lists add up, so a product that complements several products of the cart, or one
    that comes first for one of them, leads. Ties keep the order of first appearance. Entries in
    ``excluded`` never appear."""
    return vote_ranked_lists([("", 1.0, list(lists))], n, excluded)[0]


def rank_cart(sources: Sequence[tuple[str, Sequence[Sequence[T]]]], n: int, cart: Iterable[T]) -> tuple[list[T], list[str]]:
    """A cart's list: each source's lists (one per cart product) merged (``merge_ranked_lists``), the
    sources in turn, a later one filling only what the earlier ones left of ``n``. Never an entry
    of the cart, never one twice. Returns the list and the names of the sources that contributed."""
    picked: list[T] = []
    used: list[str] = []
    excluded = set(cart)
    for name, lists in sources:
        if len(picked) >= n:
            break
        more = merge_ranked_lists(lists, n - len(picked), excluded=excluded)
        if more:
            picked += more
            excluded.update(more)
            used.append(name)
    return picked, used


# The co-purchase source's vote weight in ``blend_cart`` (the similar lists vote with 1). 1 was
# best of 0.25, 0.5, 1, 2, 4 on a validation split of MovieLens-100k (docs/quality.md#cart-bought-together).
BOUGHT_TOGETHER_WEIGHT = 1.0


def blend_cart(
    together: Sequence[Sequence[T]],
    similar: Sequence[Sequence[T]],
    n: int,
    cart: Iterable[T],
    then: Sequence[tuple[str, Sequence[Sequence[T]]]] = (),
    weight: float = BOUGHT_TOGETHER_WEIGHT,
) -> tuple[list[T], list[str]]:
    """A cart's list, as ``POST /carts/recommendations`` answers: the cart products'
    bought-together lists (votes ``weight / r``) and similar lists (votes ``1 / r``) merged in one
    vote (``vote_ranked_lists``), then the ``then`` sources in turn (``rank_cart``) for what is
    left of ``n``. Never an entry of the cart, never one twice. Returns the list and the sources
    that contributed, in list order."""
    cart = list(cart)
    picked, used = vote_ranked_lists([("bought_together", weight, together), ("similar", 1.0, similar)], n, set(cart))
    more, more_used = rank_cart(then, n - len(picked), [*cart, *picked])
    return picked + more, used + [name for name in more_used if name not in used]
