"""Ranked lists from factor models: the one function (``rank_lists``) behind publish's per-user
lists, evaluate's and the API's lists ranked on request, so the three cannot drift apart.

A list is the best-scored allowed items (score: user · item factors, times the item's boost/bury
factor; never an excluded or blocked item), re-ranked by MMR when ``diversity_lambda`` > 0
(``recsys.ml.diversity`` explains the re-ranking).

Scoring is blocked, at the cost of the arithmetic: one sgemm per block of users against the
allowed items (BLAS), then one compiled pass per user (numba, both cores) that masks the user's
own items inside the block, keeps the best scores in a small heap while it scans the row (a
vectorised test per 64 scores; a heap update only for the rare one that beats the heap's worst),
and re-ranks. Selection never widens the pool to make room for filtered items.

A batch scans the items longest (scaled) vector first, and a user's scan stops at the first tile
after which no later item can score above the user's heap (Cauchy-Schwarz: |user| × |item| ×
its factor, plus the float32 rounding bound): the heap, and so the list, is what a scan of the
whole catalogue leaves. With ALS factors, popular items have long vectors, and most users stop
within the first few percent of the catalogue.

Same lists whatever the batch: BLAS rounds a dot product differently by the shape of the call
(one user on request, 256 at publish). So the float32 scores only *select*: every item within
the float32 error bound of the pool's last score is kept, and the pool is ranked by scores
recomputed in float64 in a fixed order per item (ties: lower item index first). Those do not
depend on the batch, so the list of a user is the same at publish and on request.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.sparse as sp
from numba import njit
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

# candidates re-ranked per published slot: a pool of 4 × top_n leaves room to diversify while
# every pick stays among the user's best-scored items
CANDIDATES_PER_SLOT = 4
USER_BLOCK = 128  # users per sgemm call
_TILE_BYTES = 1 << 20  # a tile of scores (users × items, float32) stays in a core's L2 cache ...
_MIN_TILE_ITEMS = 2_048  # ... down to this many items per sgemm call
_NO_COLUMN = 2**31 - 1
_SLACK = 8  # heap entries kept beyond the pool, so ties at its end rarely need a second scan
_SCAN_CHUNK = 64  # scores tested at once against the heap's worst (one vector compare and sum)
_FLOAT32_UNIT_ROUNDOFF = 2.0**-24
_REACH_MARGIN = 1e-4  # relative, on a column's reach


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero: similar to nothing), so a dot is a cosine."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


@dataclass(frozen=True)
class ItemVectors:
    """What ranking needs of a model's items, computed once per model."""

    factors: np.ndarray  # float32, C-contiguous, items × dims
    unit: np.ndarray  # factors scaled to length 1: cosines for diversity re-ranking
    norms: np.ndarray  # float32 per item: bounds the float32 rounding of a score

    @classmethod
    def of(cls, item_factors: np.ndarray) -> ItemVectors:
        factors = np.ascontiguousarray(item_factors, dtype=np.float32)
        return cls(factors, unit_rows(factors), np.linalg.norm(factors, axis=1).astype(np.float32))

    @cached_property
    def cosine(self) -> ItemVectors:
        """The unit vectors as the vectors to rank by: a dot of two is their cosine."""
        return ItemVectors(self.unit, self.unit, np.linalg.norm(self.unit, axis=1).astype(np.float32))


def rank_lists(
    user_factors: np.ndarray,
    items: ItemVectors,
    n: int,
    *,
    exclude: sp.csr_matrix | None = None,
    blocked: np.ndarray | None = None,
    factors: np.ndarray | None = None,
    diversity_lambda: float = 0.0,
    first: int | None = None,
    head: np.ndarray | None = None,
    candidates: np.ndarray | None = None,
    progress: str | None = None,
) -> np.ndarray:
    """``n`` item indices per row of ``user_factors`` (best first, -1 padded when fewer allowed).

    ``exclude``: one row per user, the items never listed for that user (bought, said no to);
    ``blocked``: bool per item, never listed for anyone (inactive, excluded by a rule, another
    category); ``factors``: per item, what the score is multiplied by (boost and bury rules).

    With ``diversity_lambda`` > 0 the best ``CANDIDATES_PER_SLOT`` × ``n`` are re-ranked by MMR.
    ``first`` (publish's ``top_n``; default ``n``): the first ``first`` picks come from the best
    ``CANDIDATES_PER_SLOT`` × ``first`` alone, as publish picks them, and later ones continue
    the list from the larger pool, penalised by their similarity to the picks before them.
    ``head`` (rows × h, -1 padded; only with ``diversity_lambda`` > 0): lists to continue instead
    (a published list); their items are not listed again, relevance is relative to the best of
    head and pool, and each row of the result starts with its head.

    ``candidates`` (rows × c item indices, -1 padded; ``recsys.ml.ann``): score only these per
    user instead of the whole catalogue; the same exclusions, factors and re-ranking apply, and
    the list is the exact one whenever a row holds the user's best-scored allowed items.

    A batch runs on every core (user blocks on threads, BLAS on one thread each); a single
    block (one user on request) runs on the calling thread. ``progress``: a progress bar's label.
    """
    if not 0 <= diversity_lambda <= 1:
        raise ValueError(f"diversity_lambda must be in [0, 1], got {diversity_lambda!r}")
    user_factors = np.ascontiguousarray(user_factors, dtype=np.float32).reshape(-1, items.factors.shape[1])
    users = len(user_factors)
    result = np.full((users, n), -1, dtype=np.int32)
    if users == 0 or n <= 0:
        return result
    if candidates is not None:
        candidates = np.ascontiguousarray(candidates, dtype=np.int32).reshape(users, -1)
    scoring = _Scoring.of(items, users, blocked, factors, every_column=candidates is not None)
    if exclude is None:
        exclude = sp.csr_matrix((users, len(items.factors)), dtype=np.float32)
    indptr, indices = exclude.indptr.astype(np.int64), exclude.indices.astype(np.int64)
    if head is None or diversity_lambda == 0:
        head = np.full((users, 0), -1, np.int32)
    head = np.asarray(head, np.int32).reshape(users, -1)
    pool = n * (CANDIDATES_PER_SLOT if diversity_lambda > 0 else 1)
    first = n if first is None else max(1, min(first, n))
    def rank_block(block: slice) -> None:
        rows = user_factors[block]
        user_norms = np.linalg.norm(rows.astype(np.float64), axis=1)
        bounds = scoring.error_bound * user_norms
        heap_scores = np.full((len(rows), pool + _SLACK), -np.inf, np.float32)
        heap_columns = np.full((len(rows), pool + _SLACK), _NO_COLUMN, np.int32)
        if candidates is None:
            scanning = [np.arange(len(rows))]  # the block's users whose later columns may still enter their heap
            for lo, scores in _score_tiles(rows, scoring, users, scanning):
                _scan_tile(scores, scanning[0], lo, scoring.scale, scoring.offset, scoring.adjust, scoring.column_of,
                           indptr[block.start : block.stop + 1], indices, head[block], heap_scores, heap_columns)
                hi = lo + scores.shape[1]
                if scoring.reach is not None and hi < scoring.n_columns:
                    # no later column can enter a heap whose worst beats |user| × the columns' reach:
                    # the heaps end as a scan of every column leaves them
                    still = scanning[0]
                    scanning[0] = still[heap_scores[still, 0] <= user_norms[still] * scoring.reach[hi]]
                    if len(scanning[0]) == 0:
                        break
        else:
            _scan_candidates(rows, candidates[block], scoring.factors, scoring.scale, scoring.offset, scoring.column_of,
                             indptr[block.start : block.stop + 1], indices, head[block], heap_scores, heap_columns,
                             np.full(scoring.n_columns, -1, np.int32))
        _finish(heap_scores, heap_columns, rows, scoring.factors, scoring.scale, scoring.unit, scoring.columns,
                scoring.column_of, scoring.offset, indptr[block.start : block.stop + 1], indices, head[block],
                items.factors, scoring.item_scale, items.unit, pool, n, first, float(diversity_lambda), bounds,
                result[block])

    _for_each_block(users, rank_block, progress)
    return result


def blocked_mask(n_items: int, blocked_items: np.ndarray | None) -> np.ndarray | None:
    """``rank_lists``' ``blocked`` (bool per item) from item indices; None when there are none."""
    if blocked_items is None or len(blocked_items) == 0:
        return None
    blocked = np.zeros(n_items, dtype=bool)
    blocked[np.asarray(blocked_items, dtype=np.int64)] = True
    return blocked


def similar_items(
    items: ItemVectors, queries: np.ndarray, n: int, blocked: np.ndarray | None = None,
    progress: str | None = None,
) -> np.ndarray:
    """The ``n`` items most similar to each of ``queries`` (item indices), best first, -1 padded:
    the cosine of their factors, ranked by ``rank_lists`` (the sgemm floor for a catalogue at
    publish; the same list for one product on request). Never the item itself, nor a ``blocked``
    one (bool per item, as ``rank_lists`` takes it)."""
    queries = np.asarray(queries, dtype=np.int64)
    n_items = len(items.factors)
    itself = sp.csr_matrix(
        (np.ones(len(queries), np.float32), queries, np.arange(len(queries) + 1)), shape=(len(queries), n_items)
    )
    cosine = items.cosine
    return rank_lists(cosine.factors[queries], cosine, n, exclude=itself, blocked=blocked, progress=progress)


def sgemm_only(user_factors: np.ndarray, items: ItemVectors) -> None:
    """Every user × every item as ``rank_lists`` scores them: the same sgemm calls on the same
    tiles, blocks and threads, every score thrown away (the benchmark's floor: the arithmetic
    of an exact top-N that scores the whole catalogue; ``rank_lists`` stops a user's scan early
    when no later item can enter the list, so it may score less)."""
    user_factors = np.ascontiguousarray(user_factors, dtype=np.float32)
    scoring = _Scoring.of(items, len(user_factors), None, None)

    def score_block(block: slice) -> None:
        for _ in _score_tiles(user_factors[block], scoring, len(user_factors)):
            pass

    _for_each_block(len(user_factors), score_block, None)


def _score_tiles(
    rows: np.ndarray, scoring: _Scoring, users: int, scanning: list[np.ndarray] | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """(first column, scores of ``rows`` × a tile of columns) per tile, in one reused buffer:
    a tile stays in a core's L2 cache between the sgemm and the scan. ``scanning``: a holder of
    the row indices the next tile scores (the caller may shorten it between tiles; every row
    when None)."""
    tile = max(_MIN_TILE_ITEMS, _TILE_BYTES // (4 * min(users, USER_BLOCK)))
    buffer = np.empty(len(rows) * min(tile, scoring.n_columns), np.float32)
    for lo in range(0, scoring.n_columns, tile):
        hi = min(lo + tile, scoring.n_columns)
        part = rows if scanning is None or len(scanning[0]) == len(rows) else rows[scanning[0]]
        scores = buffer[: len(part) * (hi - lo)].reshape(len(part), hi - lo)
        np.matmul(part, scoring.item_t[:, lo:hi], out=scores)
        yield lo, scores


def _for_each_block(users: int, work: Callable[[slice], None], progress: str | None) -> None:
    """``work`` on every block of ``USER_BLOCK`` users: on every core, each block's BLAS on one
    thread; a single block on the calling thread."""
    blocks = [slice(start, min(start + USER_BLOCK, users)) for start in range(0, users, USER_BLOCK)]
    workers = min(len(blocks), _cores())
    if workers <= 1:
        for block in blocks:
            work(block)
        return
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as threads, tqdm(
        total=users, desc=progress, disable=progress is None, unit="user"
    ) as bar:
        for block, _ in zip(blocks, threads.map(work, blocks), strict=True):
            bar.update(block.stop - block.start)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class _Scoring:
    """The items a call scores (its columns) and how a column's float32 score is adjusted."""

    columns: np.ndarray  # int32: the item of each column
    column_of: np.ndarray  # int64 per item: its column, -1 if not scored
    factors: np.ndarray  # the columns' factors (columns × dims, C-contiguous)
    unit: np.ndarray  # their unit vectors
    item_scale: np.ndarray  # float32 per item: the factor its score is multiplied by
    scale: np.ndarray  # float32 per column
    offset: np.ndarray  # float32 per column: -inf for a blocked item that is still a column, else 0
    adjust: bool  # whether scale or offset change any score
    error_bound: float  # per unit of user norm: see _score_error_bound
    # per column (a batch only): the most a float32 score of it or any later column can be, per
    # unit of user norm (Cauchy-Schwarz: |user| × |item| × |factor|, plus the rounding bound). A
    # batch scans the longest (scaled) vectors first, so for most users the heap's worst soon
    # beats everything left and the rest of the catalogue is never scored.
    reach: np.ndarray | None

    @property
    def n_columns(self) -> int:
        return len(self.columns)

    @property
    def item_t(self) -> np.ndarray:
        """dims × columns: what BLAS multiplies by (a transposed view, no copy)."""
        return self.factors.T

    @classmethod
    def of(
        cls, items: ItemVectors, users: int, blocked: np.ndarray | None, factors: np.ndarray | None,
        every_column: bool = False,
    ) -> _Scoring:
        """``every_column``: every item a column in index order, the blocked ones masked (scoring
        candidates reads a few rows per user: no copy of the factors)."""
        n_items = len(items.factors)
        allowed = np.ones(n_items, dtype=bool) if blocked is None else ~np.asarray(blocked, dtype=bool)
        item_scale = np.ones(n_items, np.float32) if factors is None else np.ascontiguousarray(factors, dtype=np.float32)
        if every_column:
            columns = np.arange(n_items, dtype=np.int32)
        elif users > 1:
            # a batch scores only the allowed items (one copy of their factors), the longest
            # (scaled) vectors first: they tend to score highest, so the heaps fill with good
            # scores early and later ones rarely beat them
            columns = np.flatnonzero(allowed)
            columns = columns[np.argsort(-(items.norms[columns] * item_scale[columns]), kind="stable")].astype(np.int32)
        elif allowed.mean() < 0.5:  # one user on request: the allowed few
            columns = np.flatnonzero(allowed).astype(np.int32)
        else:  # one user on request: the blocked ones are masked, saving a copy of the factors
            columns = np.arange(n_items, dtype=np.int32)
        column_of = np.full(n_items, -1, dtype=np.int64)
        column_of[columns] = np.arange(len(columns))
        scale = item_scale[columns]
        offset = np.where(allowed[columns], np.float32(0), np.float32(-np.inf)).astype(np.float32)
        as_is = len(columns) == n_items and (users == 1 or every_column)
        error_bound = _score_error_bound(items, columns, scale)
        reach = None
        if users > 1 and not every_column and len(columns):
            longest = items.norms[columns].astype(np.float64) * np.abs(scale.astype(np.float64))
            # float32 norms are off by a few units in the 7th digit: a margin far above that
            reach = np.maximum.accumulate(longest[::-1])[::-1] * (1 + _REACH_MARGIN) + error_bound
        return cls(
            columns, column_of, items.factors if as_is else items.factors[columns], items.unit if as_is else items.unit[columns],
            item_scale, scale, offset,
            factors is not None or not allowed[columns].all(), error_bound, reach,
        )


def _score_error_bound(items: ItemVectors, columns: np.ndarray, scale: np.ndarray) -> float:
    """Per unit of user norm: twice the most a float32 score (any summation order, then the
    factor's product) can be off from the exact one, over the scored items."""
    if len(columns) == 0:
        return 0.0
    largest = float(np.max(items.norms[columns].astype(np.float64) * scale))
    if not math.isfinite(largest):
        return math.inf
    return 2.0 * (items.factors.shape[1] + 4) * _FLOAT32_UNIT_ROUNDOFF * 1.25 * largest


# ---------------------------------------------------------------------------- compiled kernels


@njit(cache=True, inline="always")
def _worse(score_a, column_a, score_b, column_b):
    return score_a < score_b or (score_a == score_b and column_a > column_b)


@njit(cache=True, nogil=True)
def _heap_replace_top(heap_scores, heap_columns, score, column):
    """Replace the worst entry (the root of the min-heap) and sift it down."""
    size = len(heap_scores)
    at = 0
    while True:
        child = 2 * at + 1
        if child >= size:
            break
        right = child + 1
        if right < size and _worse(heap_scores[right], heap_columns[right], heap_scores[child], heap_columns[child]):
            child = right
        if not _worse(heap_scores[child], heap_columns[child], score, column):
            break
        heap_scores[at] = heap_scores[child]
        heap_columns[at] = heap_columns[child]
        at = child
    heap_scores[at] = score
    heap_columns[at] = column


@njit(cache=True, nogil=True)
def _scan_tile(scores, block_rows, column_start, scale, offset, adjust, column_of, indptr, indices, head, heap_scores,
               heap_columns):
    """One tile of scores (row ``i``: the block's user ``block_rows[i]`` × a range of columns)
    into each user's heap: scores multiplied by the column's factor, blocked columns, the user's
    own items and head at -inf, then the best of them kept."""
    width = scores.shape[1]
    column_end = column_start + width
    for i in range(scores.shape[0]):
        r = block_rows[i]
        row = scores[i]
        if adjust:
            for j in range(width):
                row[j] = row[j] * scale[column_start + j] + offset[column_start + j]
        for e in range(indptr[r], indptr[r + 1]):
            column = column_of[indices[e]]
            if column_start <= column < column_end:
                row[column - column_start] = -np.inf
        for h in range(head.shape[1]):
            if head[r, h] >= 0:
                column = column_of[head[r, h]]
                if column_start <= column < column_end:
                    row[column - column_start] = -np.inf
        _scan(row, column_start, heap_scores[r], heap_columns[r])


@njit(cache=True, nogil=True)
def _scan_candidates(users, candidates, column_factors, scale, offset, column_of, indptr, indices, head, heap_scores,
                     heap_columns, seen):
    """Each user's candidates (item indices, -1 skipped) into the user's heap, as ``_scan_tile``
    puts a tile of every column: float32 score times the column's factor, blocked columns, the
    user's own items and head never in, a candidate listed twice counted once. ``seen``: -1 per
    column (marks of the block's rows)."""
    dims = users.shape[1]
    for r in range(users.shape[0]):
        for e in range(indptr[r], indptr[r + 1]):
            column = column_of[indices[e]]
            if column >= 0:
                seen[column] = r
        for h in range(head.shape[1]):
            if head[r, h] >= 0 and column_of[head[r, h]] >= 0:
                seen[column_of[head[r, h]]] = r
        worst = heap_scores[r, 0]
        for j in range(candidates.shape[1]):
            item = candidates[r, j]
            if item < 0:
                continue
            column = column_of[item]
            if column < 0 or seen[column] == r:
                continue
            seen[column] = r
            score = np.float32(0.0)
            for d in range(dims):
                score += users[r, d] * column_factors[column, d]
            score = score * scale[column] + offset[column]
            if score > worst:
                _heap_replace_top(heap_scores[r], heap_columns[r], score, column)
                worst = heap_scores[r, 0]


@njit(cache=True, nogil=True)
def _scan(row, column_start, heap_scores, heap_columns):
    """The best ``len(heap)`` finite scores so far: every score is tested against the heap's
    worst 64 at a time (a vector compare), then 8 at a time, and only one that beats it is
    inserted."""
    worst = heap_scores[0]
    n = len(row)
    whole = n - n % _SCAN_CHUNK
    for lo in range(0, whole, _SCAN_CHUNK):
        beats = 0
        for j in range(lo, lo + _SCAN_CHUNK):
            beats += row[j] > worst
        if beats == 0:
            continue
        for sub in range(lo, lo + _SCAN_CHUNK, 8):
            beats = 0
            for j in range(sub, sub + 8):
                beats += row[j] > worst
            if beats == 0:
                continue
            for j in range(sub, sub + 8):
                if row[j] > worst:
                    _heap_replace_top(heap_scores, heap_columns, row[j], column_start + j)
                    worst = heap_scores[0]
    for j in range(whole, n):
        if row[j] > worst:
            _heap_replace_top(heap_scores, heap_columns, row[j], column_start + j)
            worst = heap_scores[0]


@njit(cache=True, nogil=True)
def _dot(user, vector):
    """``user`` · ``vector`` in float64, in one fixed order (8 interleaved partial sums, then
    summed pairwise): the same value whatever the batch."""
    dims = len(user)
    whole = dims - dims % 8
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    for lo in range(0, whole, 8):
        s0 += np.float64(user[lo]) * np.float64(vector[lo])
        s1 += np.float64(user[lo + 1]) * np.float64(vector[lo + 1])
        s2 += np.float64(user[lo + 2]) * np.float64(vector[lo + 2])
        s3 += np.float64(user[lo + 3]) * np.float64(vector[lo + 3])
        s4 += np.float64(user[lo + 4]) * np.float64(vector[lo + 4])
        s5 += np.float64(user[lo + 5]) * np.float64(vector[lo + 5])
        s6 += np.float64(user[lo + 6]) * np.float64(vector[lo + 6])
        s7 += np.float64(user[lo + 7]) * np.float64(vector[lo + 7])
    for d in range(whole, dims):
        s0 += np.float64(user[d]) * np.float64(vector[d])
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(cache=True, nogil=True)
def _sort_best_first(scores, keys):
    """In place: by score, best first; ties by lower key (insertion sort: a pool is small)."""
    for i in range(1, len(scores)):
        score, key = scores[i], keys[i]
        j = i - 1
        while j >= 0 and (scores[j] < score or (scores[j] == score and keys[j] > key)):
            scores[j + 1] = scores[j]
            keys[j + 1] = keys[j]
            j -= 1
        scores[j + 1] = score
        keys[j + 1] = key


@njit(cache=True, nogil=True)
def _pool(heap_scores, heap_columns, user, column_factors, column_scale, columns, bound, sorted_scores,
          sorted_columns, items, exact):
    """The best ``len(items)`` items of one user by exact score, best first, into ``items`` and
    ``exact``; returns how many, or -1 when the heap cannot tell them.

    Every item whose float32 score is within the rounding bound of the pool's last one may be
    in the exact pool. Those are in the heap unless the heap is full and its worst is within
    the bound too (ties, rare): then the caller scores every column exactly (``_exact_pool``)."""
    size = len(items)
    held = 0
    for i in range(len(heap_scores)):
        sorted_scores[i] = heap_scores[i]
        sorted_columns[i] = heap_columns[i]
        held += heap_scores[i] > -np.inf
    _sort_best_first(sorted_scores, sorted_columns)
    within = held
    if held > size:
        floor = sorted_scores[size - 1] - bound
        if held == len(sorted_scores) and sorted_scores[held - 1] >= floor:
            return -1
        within = 0
        for i in range(held):
            within += sorted_scores[i] >= floor
    # within ≤ len(heap) = pool + slack: exact scores of them all, then the best ``size``
    candidates = np.empty(within, np.int32)
    scores = np.empty(within, np.float64)
    for i in range(within):
        column = sorted_columns[i]
        candidates[i] = columns[column]
        scores[i] = _dot(user, column_factors[column]) * np.float64(column_scale[column])
    _sort_best_first(scores, candidates)
    take = min(size, within)
    items[:take] = candidates[:take]
    exact[:take] = scores[:take]
    return take


@njit(cache=True, nogil=True)
def _exact_pool(r, user, column_factors, column_scale, columns, column_of, offset, indptr, indices, head, items, exact):
    """``_pool`` from every column the user may get, all scored exactly (the rare fallback)."""
    excluded = offset == -np.inf
    for e in range(indptr[r], indptr[r + 1]):
        if column_of[indices[e]] >= 0:
            excluded[column_of[indices[e]]] = True
    for h in range(head.shape[1]):
        if head[r, h] >= 0 and column_of[head[r, h]] >= 0:
            excluded[column_of[head[r, h]]] = True
    allowed = np.flatnonzero(~excluded)
    allowed = allowed[np.argsort(columns[allowed], kind="mergesort")]  # by item
    scores = np.empty(len(allowed), np.float64)
    for i in range(len(allowed)):
        scores[i] = _dot(user, column_factors[allowed[i]]) * np.float64(column_scale[allowed[i]])
    best = np.argsort(-scores, kind="mergesort")[: len(items)]  # stable: ties keep the lower item index
    take = len(best)
    items[:take] = columns[allowed[best]]
    exact[:take] = scores[best]
    return take


@njit(cache=True, nogil=True)
def _finish(
    heap_scores, heap_columns, users, column_factors, column_scale, column_unit, columns, column_of, offset, indptr,
    indices, head, item_factors, item_scale, unit, pool_size, n, first, diversity_lambda, bounds, out,
):
    """Each user's pool ranked exactly, then re-ranked by MMR (λ > 0) into ``out``. ``column_*``:
    the scored items' factors, factors and unit vectors in column order (cache-friendly: the best
    candidates sit in the first columns); ``item_*`` and ``unit``: the same by item index."""
    heap_size = heap_scores.shape[1]
    sorted_scores = np.empty(heap_size, np.float32)
    sorted_columns = np.empty(heap_size, np.int32)
    items = np.empty(pool_size, np.int32)
    exact = np.empty(pool_size, np.float64)
    candidates = np.empty(pool_size, np.int32)
    rows = np.empty(pool_size, np.int64)
    chosen = np.empty(max(head.shape[1], first), np.int32)
    rest = np.empty(pool_size, np.int32)
    rest_rows = np.empty(pool_size, np.int64)
    rest_scores = np.empty(pool_size, np.float64)
    picks = np.empty(n, np.int32)
    vectors = np.empty((unit.shape[1], pool_size))
    relevance = np.empty(pool_size)
    max_similarity = np.empty(pool_size)
    similarity = np.empty(pool_size)
    open_slot = np.empty(pool_size, np.bool_)
    for r in range(len(users)):
        user = users[r]
        count = _pool(heap_scores[r], heap_columns[r], user, column_factors, column_scale, columns, bounds[r],
                      sorted_scores, sorted_columns, items, exact)
        if count < 0:
            count = _exact_pool(r, user, column_factors, column_scale, columns, column_of, offset, indptr, indices,
                                head, items, exact)
        if diversity_lambda == 0:
            out[r, : min(n, count)] = items[: min(n, count)]
            continue
        candidates[:] = -1
        candidates[:count] = items[:count]
        for i in range(count):
            rows[i] = column_of[items[i]]
        head_count = 0
        for h in range(head.shape[1]):
            if head[r, h] >= 0:
                chosen[head_count] = head[r, h]
                head_count += 1
        if head_count > 0:
            top = exact[0] if count else -np.inf
            for h in range(head_count):
                top = max(top, _dot(user, item_factors[chosen[h]]) * np.float64(item_scale[chosen[h]]))
            take = min(head_count, n)
            out[r, :take] = chosen[:take]
            if n > head_count:
                _mmr(candidates, rows, exact, picks[: n - head_count], diversity_lambda, column_unit,
                     chosen[:head_count], unit, top, vectors, relevance, max_similarity, similarity, open_slot)
                out[r, head_count:] = picks[: n - head_count]
            continue
        if count == 0:
            continue
        top = exact[0]
        opening = min(count, CANDIDATES_PER_SLOT * first)
        _mmr(candidates[:opening], rows, exact, picks[:first], diversity_lambda, column_unit, chosen[:0], unit, top,
             vectors, relevance, max_similarity, similarity, open_slot)
        out[r, :first] = picks[:first]
        if n > first:
            at = 0
            for i in range(count):
                taken = False
                for p in range(first):
                    taken |= picks[p] == items[i]
                if not taken:
                    rest[at] = items[i]
                    rest_rows[at] = rows[i]
                    rest_scores[at] = exact[i]
                    at += 1
            rest[at:] = -1
            chosen[:first] = picks[:first]
            _mmr(rest, rest_rows, rest_scores, picks[first:], diversity_lambda, column_unit, chosen[:first], unit,
                 top, vectors, relevance, max_similarity, similarity, open_slot)
            out[r, first:] = picks[first:]


@njit(cache=True, nogil=True)
def mmr_row(candidates, scores, picks, diversity_lambda, unit, chosen, top):
    """MMR's first ``len(picks)`` picks among ``candidates`` (best first, -1 ends them) into
    ``picks`` (-1 padded); ``chosen`` (-1 padded): picks made before, penalising from the first
    slot on; ``top``: the score relevance is relative to (a non-positive one keeps raw scores).
    Ties go to the earlier, better-scored candidate. ``unit``: unit vectors by item index."""
    width = len(candidates)
    _mmr(candidates, candidates.astype(np.int64), scores, picks, diversity_lambda, unit, chosen, unit, top,
         np.empty((unit.shape[1], width)), np.empty(width), np.empty(width), np.empty(width), np.empty(width, np.bool_))


@njit(cache=True, nogil=True)
def _mmr(candidates, rows, scores, picks, diversity_lambda, candidate_unit, chosen, chosen_unit, top, vectors,
         relevance, max_similarity, similarity, open_slot):
    """``mmr_row`` with the candidates' unit vectors at ``rows`` of ``candidate_unit``, the
    chosen ones' by item in ``chosen_unit``, and its working arrays given (each at least as long
    as ``candidates``; ``vectors``: dims × that)."""
    width = 0
    while width < len(candidates) and candidates[width] >= 0:
        width += 1
    picks[:] = -1
    if width == 0:
        return
    dims = candidate_unit.shape[1]
    # the candidates' unit vectors, dims-major: one pick's cosines to all of them in one pass per dim
    for i in range(width):
        row = candidate_unit[rows[i]]
        for d in range(dims):
            vectors[d, i] = row[d]
    for i in range(width):
        relevance[i] = scores[i] / top if top > 0 else scores[i]
        max_similarity[i] = 0.0
        open_slot[i] = True
    has_chosen = False
    for c in range(len(chosen)):
        if chosen[c] < 0:
            continue
        _similarities(chosen_unit[chosen[c]], vectors, width, similarity)
        for i in range(width):
            max_similarity[i] = similarity[i] if not has_chosen else max(max_similarity[i], similarity[i])
        has_chosen = True
    for slot in range(min(len(picks), width)):
        best = -1
        best_value = -np.inf
        for i in range(width):
            if open_slot[i]:
                value = (1 - diversity_lambda) * relevance[i] - diversity_lambda * max_similarity[i]
                if best < 0 or value > best_value:
                    best, best_value = i, value
        picks[slot] = candidates[best]
        open_slot[best] = False
        if slot == len(picks) - 1:
            break
        _similarities(candidate_unit[rows[best]], vectors, width, similarity)
        # a list's first pick has no predecessor: before it the penalty is 0, after it the max so far
        replace = slot == 0 and not has_chosen
        for i in range(width):
            max_similarity[i] = similarity[i] if replace else max(max_similarity[i], similarity[i])


@njit(cache=True, nogil=True)
def _similarities(vector, vectors, width, out):
    """``vector`` · each of the first ``width`` columns of ``vectors`` (dims-major), in float64."""
    out[:width] = 0.0
    for d in range(len(vector)):
        row = vectors[d]
        v = np.float64(vector[d])
        for i in range(width):
            out[i] += v * row[i]
