"""Matrix stage: validated interactions -> id maps and weighted CSR users x products.

Outputs (all npz / Parquet / JSON, no pickle), in one folder:

- ``users.parquet`` / ``items.parquet``: row/column index -> the shop's own id (sorted, so the
  same data always gives the same maps); items also carry ``active``, ``category``, ``buyers``
  (distinct purchasers) and ``popularity`` (distinct users with any interaction).
- ``full.npz``: weights over the whole window (what the published model trains on).
- ``exclude.npz``: who already has what (``exclude_event_types``) or gave negative feedback on it
  (``negative_event_types``, in the window or before it): never recommended again.
- ``train.npz``, ``train_exclude.npz``, ``holdout.npz``: the same split at the holdout cutoff;
  ``holdout.npz`` marks relevant items (``relevant_event_types``) after the cutoff that the user
  did not already have before it.

Negative feedback counts not at all in training (measured against counting it negatively:
docs/quality.md#negative-feedback): a (user, product) pair with a negative event has no weight
in ``full`` / ``train``, whatever else the user did with the product, so a return cancels the
purchase it returns. Nor is such a pair a hit of the holdout, or a buyer of top buys. A user left
with no weight at all (only negative feedback, or only returned purchases) is not in the model:
the API serves them as a cold start, with their negative feedback read from the shop database.

- ``baskets.npz``: baskets x products over the whole window, 1 where the basket holds the product;
  a basket is one user's ``basket_event_types`` events on one UTC day (what bought-together
  lists are computed from, ``recsys.ml.co_purchase``).
- ``new_items.parquet``, ``content.npz``, ``new_exclude.npz``: active products with no
  interaction in the window, and what publish lists them by (``recsys.pipeline.new_products``).
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from recsys.core.errors import InputError
from recsys.core.ids import IdTypes
from recsys.core.layout import BASKETS, EXCLUDE, FULL, HOLDOUT, ITEMS, MANIFEST, TRAIN, TRAIN_EXCLUDE, USERS
from recsys.core.params import PipelineParams
from recsys.core.window import Window
from recsys.ml.co_purchase import basket_keys, basket_matrix
from recsys.ml.weighting import decayed_weights, scale_confidence
from recsys.pipeline.new_products import write_new_products

log = logging.getLogger(__name__)

MICROS_PER_DAY = 86_400 * 1_000_000


@dataclass(frozen=True)
class MatrixResult:
    matrix_dir: Path
    n_users: int
    n_items: int
    nnz: int


# Interactions are read in batches of this many rows, one at a time (no read-ahead): memory is
# bounded by the numeric columns (13 bytes a row) and one batch of strings, not by the window's.
BATCH_ROWS = 1 << 20

# bits of the per-interaction flags column
BEFORE_CUTOFF, EXCLUDED, RELEVANT, PURCHASE, NEGATIVE, BASKET = 1, 2, 4, 8, 16, 32


def _csr(rows: np.ndarray, cols: np.ndarray, data: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """CSR with duplicate (row, col) pairs summed."""
    matrix = sp.csr_matrix((data, (rows, cols)), shape=shape, dtype=np.float32)
    matrix.sum_duplicates()
    return matrix


def _binarize(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """Every stored value set to 1, in place (callers pass matrices they just built)."""
    matrix.data[:] = 1
    return matrix


def _write_npz(path: Path, matrix: sp.csr_matrix) -> None:
    tmp = path.with_suffix(".tmp.npz")
    sp.save_npz(tmp, matrix.tocsr())
    tmp.replace(path)


def load_ids(path: Path) -> list[str]:
    return pq.read_table(path, columns=["id"])["id"].to_pylist()


def _distinct_ids(interactions: pq.ParquetFile) -> tuple[pa.Array, pa.Array]:
    """Sorted distinct user and product ids (sorted, so the same data always gives the same maps)."""
    users = products = pa.array([], pa.string())
    for batch in interactions.iter_batches(BATCH_ROWS, columns=["user_id", "product_id"], use_threads=False):
        users = pc.unique(pa.concat_arrays([users, pc.unique(batch["user_id"].cast(pa.string()))]))
        products = pc.unique(pa.concat_arrays([products, pc.unique(batch["product_id"].cast(pa.string()))]))
    return users.sort(), products.sort()


@dataclass
class _Interactions:
    """One row per interaction, numbers only: what every matrix of the stage is built from."""

    users: np.ndarray  # int32 row index
    items: np.ndarray  # int32 column index
    weights: np.ndarray  # float32, before confidence scaling
    flags: np.ndarray  # uint8, BEFORE_CUTOFF | EXCLUDED | RELEVANT | PURCHASE | NEGATIVE | BASKET
    # basket key (recsys.ml.co_purchase.basket_keys) of each BASKET row, in row order: only those
    # rows carry one, so a window of mostly views costs little more
    basket_keys: np.ndarray

    def where(self, flag: int) -> np.ndarray:
        return (self.flags & flag) != 0

    def keep_users(self, kept: np.ndarray, n_users: int) -> None:
        """Only the rows of user indices ``kept`` (sorted), renumbered 0 .. len(kept) - 1."""
        renumbered = np.full(n_users, -1, np.int32)
        renumbered[kept] = np.arange(len(kept), dtype=np.int32)
        users = renumbered[self.users]
        rows = users >= 0
        self.basket_keys = self.basket_keys[rows[self.where(BASKET)]]  # keys stay aligned with BASKET rows
        self.users, self.items, self.weights, self.flags = users[rows], self.items[rows], self.weights[rows], self.flags[rows]


def _event_type_tables(params: PipelineParams) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Event type vocabulary with each type's weight and flags; the extra last slot is for a type
    the params do not know (weight 0, no flags). Negative types weigh 0: they count by their flag."""
    names = sorted({
        *params.event_weights, *params.exclude_event_types, *params.relevant_event_types,
        *params.negative_event_types, *params.basket_event_types, "purchase",
    })
    weights = np.array([params.event_weights.get(name, 0.0) for name in names] + [0.0])
    flags = np.array(
        [
            EXCLUDED * (name in params.exclude_event_types)
            | RELEVANT * (name in params.relevant_event_types)
            | PURCHASE * (name == "purchase")
            | NEGATIVE * (name in params.negative_event_types)
            | BASKET * (name in params.basket_event_types)
            for name in names
        ]
        + [0],
        dtype=np.uint8,
    )
    return pa.array(names, pa.string()), weights, flags


def _read_interactions(
    interactions: pq.ParquetFile,
    user_ids: pa.Array,
    item_ids: pa.Array,
    window: Window,
    cutoff: datetime,
    params: PipelineParams,
) -> _Interactions:
    rows = interactions.metadata.num_rows
    table = _Interactions(
        users=np.empty(rows, np.int32),
        items=np.empty(rows, np.int32),
        weights=np.empty(rows, np.float32),
        flags=np.empty(rows, np.uint8),
        basket_keys=np.empty(0, np.int64),
    )
    keys_by_batch = []
    type_names, weight_by_type, flags_by_type = _event_type_tables(params)
    unknown_type = len(type_names)
    end_us = int(window.end.timestamp() * 1_000_000)
    cutoff_us = int(cutoff.timestamp() * 1_000_000)
    start = 0
    for batch in interactions.iter_batches(BATCH_ROWS, use_threads=False):
        part = slice(start, start + batch.num_rows)
        start = part.stop
        table.users[part] = pc.index_in(batch["user_id"].cast(pa.string()), value_set=user_ids).to_numpy()
        table.items[part] = pc.index_in(batch["product_id"].cast(pa.string()), value_set=item_ids).to_numpy()
        types = pc.index_in(batch["event_type"].cast(pa.string()), value_set=type_names)
        types = pc.fill_null(types, unknown_type).to_numpy()
        occurred_us = pc.cast(batch["occurred_at"], pa.int64()).to_numpy()
        values = batch["value"].to_numpy(zero_copy_only=False).astype(np.float64)
        table.weights[part] = decayed_weights(
            weight_by_type[types], values, (end_us - occurred_us) / MICROS_PER_DAY, params.half_life_days
        )
        table.flags[part] = flags_by_type[types] | np.where(occurred_us < cutoff_us, BEFORE_CUTOFF, 0)
        in_basket = (flags_by_type[types] & BASKET) != 0
        keys_by_batch.append(basket_keys(table.users[part][in_basket], occurred_us[in_basket] // MICROS_PER_DAY))
    table.basket_keys = np.concatenate(keys_by_batch) if keys_by_batch else table.basket_keys
    return table


def build_matrix(
    interactions_path: Path,
    products_path: Path,
    window: Window,
    matrix_dir: Path,
    params: PipelineParams,
    id_types: IdTypes,
    older_negatives_path: Path | None = None,
) -> MatrixResult:
    """``older_negatives_path``: the extract's (user, product) pairs with negative feedback from
    before the window (absent: none), excluded like the window's own."""
    matrix_dir.mkdir(parents=True, exist_ok=True)
    interactions = pq.ParquetFile(interactions_path, pre_buffer=False)
    user_ids, item_ids = _distinct_ids(interactions)
    shape = (len(user_ids), len(item_ids))
    cutoff = window.end - timedelta(days=params.holdout_days)
    rows = _read_interactions(interactions, user_ids, item_ids, window, cutoff, params)
    # Arrow's allocator keeps freed batch memory for reuse; the CSR builds below are numpy's
    pa.default_memory_pool().release_unused()

    def marked(mask: np.ndarray) -> sp.csr_matrix:
        return _binarize(_csr(rows.users[mask], rows.items[mask], np.ones(int(mask.sum()), np.float32), shape))

    def without(matrix: sp.csr_matrix, pairs: sp.csr_matrix) -> sp.csr_matrix:
        """``matrix`` minus its entries at the (binary) ``pairs``."""
        kept = (matrix - matrix.multiply(pairs)).tocsr()
        kept.eliminate_zeros()
        return kept

    def weighted(mask: np.ndarray) -> sp.csr_matrix:
        summed = _csr(rows.users[mask], rows.items[mask], rows.weights[mask], shape)
        # a pair with negative feedback in the same span counts not at all (a return cancels its purchase)
        return scale_confidence(without(summed, marked(mask & rows.where(NEGATIVE))), params.confidence_scaling)

    everything = np.ones(len(rows.users), dtype=bool)
    full = weighted(everything)
    # a user with no weight left would get a list from untrained factors: out of the model
    trained_users = np.flatnonzero(np.diff(full.indptr) > 0)
    users_without_weight = shape[0] - len(trained_users)
    if users_without_weight:
        rows.keep_users(trained_users, shape[0])
        user_ids, full = user_ids.take(pa.array(trained_users)), full[trained_users]
        shape = (len(trained_users), shape[1])
    # each matrix is written as soon as it is built, so only the ones still needed stay in memory
    _write_npz(matrix_dir / FULL, full)
    nnz, popularity = int(full.nnz), _distinct_users(full)
    del full
    before_cutoff, excluded, negative = rows.where(BEFORE_CUTOFF), rows.where(EXCLUDED), rows.where(NEGATIVE)
    train = weighted(before_cutoff)
    _write_npz(matrix_dir / TRAIN, train)
    train_nnz = int(train.nnz)
    del train
    older_negatives = _older_negatives(older_negatives_path, user_ids, item_ids, shape)
    negative_pairs = marked(negative)
    _write_npz(matrix_dir / EXCLUDE, _binarize(marked(excluded) + negative_pairs + older_negatives))
    train_exclude = _binarize(marked((excluded | negative) & before_cutoff) + older_negatives)
    _write_npz(matrix_dir / TRAIN_EXCLUDE, train_exclude)
    # relevant after the cutoff, minus what the user already had before it (never recommendable)
    # and minus what the user gave negative feedback on (a returned purchase is no hit)
    holdout = marked(rows.where(RELEVANT) & ~before_cutoff)
    holdout = _binarize(without(without(holdout, train_exclude), negative_pairs))
    _write_npz(matrix_dir / HOLDOUT, holdout)
    buyers = _distinct_users(without(marked(rows.where(PURCHASE)), negative_pairs))
    # a returned purchase was not bought together with anything
    in_basket = rows.where(BASKET)
    returned = _holds(negative_pairs, rows.users[in_basket], rows.items[in_basket])
    baskets = basket_matrix(rows.basket_keys[~returned], rows.items[in_basket][~returned], shape[1])
    _write_npz(matrix_dir / BASKETS, baskets)

    pq.write_table(pa.table({"id": user_ids}), matrix_dir / USERS)
    items_meta, unknown_products = _items_with_catalogue(item_ids, products_path)
    # distinct buyers / distinct users per product: what "top buys" ranks by
    items_meta = items_meta.append_column("buyers", pa.array(buyers))
    items_meta = items_meta.append_column("popularity", pa.array(popularity))
    pq.write_table(items_meta, matrix_dir / ITEMS)
    new_products = write_new_products(
        matrix_dir, item_ids, products_path, id_types.product,
        lambda new_ids: _older_negatives(older_negatives_path, user_ids, new_ids, (len(user_ids), len(new_ids))),
    )

    counts = {
        "interactions": len(rows.users),
        "users": shape[0],
        "items": shape[1],
        "nnz": nnz,
        "train_nnz": train_nnz,
        "holdout_users": int((np.diff(holdout.indptr) > 0).sum()),
        "holdout_pairs": int(holdout.nnz),
        "baskets": baskets.shape[0],
        "active_items": int(pc.sum(items_meta["active"]).as_py() or 0),
        "items_missing_from_catalogue": unknown_products,
        "new_products": new_products,
        "negative_pairs": int(negative_pairs.nnz),
        "older_negative_pairs": int(older_negatives.nnz),
        "users_without_weight": users_without_weight,
    }
    manifest = {
        "build_id": uuid.uuid4().hex,  # the stages after this one record which build they used
        "window": window.to_dict(),
        "id_types": id_types.to_dict(),
        "holdout_cutoff": cutoff.isoformat(),
        "counts": counts,
        "params": params.to_dict(),
    }
    (matrix_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if unknown_products:
        log.warning("%d interacted products are not in the catalogue; they will not be recommended", unknown_products)
    log.info("matrix: %s", counts)
    return MatrixResult(matrix_dir=matrix_dir, n_users=shape[0], n_items=shape[1], nnz=nnz)


def _older_negatives(
    path: Path | None, user_ids: pa.Array, item_ids: pa.Array, shape: tuple[int, int]
) -> sp.csr_matrix:
    """The extract's negative pairs from before the window, for users and products of this matrix
    (binary; a pair of anyone else has no row or column to mark)."""
    if path is None or not path.exists():
        return sp.csr_matrix(shape, dtype=np.float32)
    pairs = pq.read_table(path, columns=["user_id", "product_id"])
    users = pc.index_in(pairs["user_id"].cast(pa.string()), value_set=user_ids)
    items = pc.index_in(pairs["product_id"].cast(pa.string()), value_set=item_ids)
    known = pc.and_(pc.is_valid(users), pc.is_valid(items))
    users, items = (pc.filter(column, known).to_numpy(zero_copy_only=False) for column in (users, items))
    return _binarize(_csr(users, items, np.ones(len(users), np.float32), shape))


def _holds(pairs: sp.csr_matrix, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Whether each (user, item) is a stored pair of ``pairs``."""
    if len(users) == 0 or pairs.nnz == 0:
        return np.zeros(len(users), dtype=bool)
    return np.asarray(pairs[users, items]).ravel() > 0


def _distinct_users(matrix: sp.csr_matrix) -> np.ndarray:
    return np.bincount(matrix.indices, minlength=matrix.shape[1]).astype(np.int64)


def _items_with_catalogue(item_ids: pa.Array, products_path: Path) -> tuple[pa.Table, int]:
    """Item index -> id, active, category. A product missing from the catalogue is inactive."""
    products = pq.read_table(products_path)
    position = pc.index_in(item_ids, value_set=products["product_id"])
    in_catalogue = pc.is_valid(position)
    active = pc.fill_null(pc.take(products["active"], position), False)
    category = pc.take(products["category"], position)
    unknown = len(item_ids) - int(pc.sum(in_catalogue).as_py() or 0)
    return pa.table({"id": item_ids, "active": active, "category": category}), unknown


def load_baskets(matrix_dir: Path) -> sp.csr_matrix:
    """The window's baskets x items (``baskets.npz``)."""
    path = matrix_dir / BASKETS
    if not path.exists():
        raise InputError(f"{matrix_dir} was built by an older recsys without baskets; run its matrix stage again")
    return sp.load_npz(path).tocsr()


def inactive_items(matrix_dir: Path) -> np.ndarray:
    """Item indices that must never be recommended (inactive or missing from the catalogue)."""
    active = pq.read_table(matrix_dir / ITEMS, columns=["active"])["active"].to_numpy(
        zero_copy_only=False
    )
    return np.flatnonzero(~active.astype(bool)).astype(np.int32)


@dataclass(frozen=True)
class HoldoutSplit:
    """A matrix folder's holdout split as evaluation and tuning read it: fit before the cutoff,
    score on relevant items after it, for users who have a history before it."""

    fit: sp.csr_matrix
    validation: sp.csr_matrix  # holdout rows of users without history are empty
    exclude: sp.csr_matrix
    blocked_items: np.ndarray
    manifest: dict

    @property
    def users(self) -> np.ndarray:
        return np.flatnonzero(np.diff(self.validation.indptr) > 0).astype(np.int32)


def holdout_split(matrix_dir: Path) -> HoldoutSplit:
    manifest = json.loads((matrix_dir / MANIFEST).read_text())
    fit = sp.load_npz(matrix_dir / TRAIN).tocsr()
    holdout = sp.load_npz(matrix_dir / HOLDOUT).tocsr()
    # users without history before the cutoff are cold starts: no model of theirs to judge
    has_history = (np.diff(fit.indptr) > 0).astype(np.float32)
    validation = (sp.diags(has_history) @ holdout).tocsr()
    validation.eliminate_zeros()
    if validation.nnz == 0:
        relevant = ", ".join(manifest["params"]["relevant_event_types"])
        raise InputError(
            f"no user has interactions both before the holdout cutoff {manifest['holdout_cutoff']} and "
            f"relevant ones ({relevant}) after it; widen lookback_days / holdout_days"
        )
    return HoldoutSplit(
        fit=fit,
        validation=validation,
        exclude=sp.load_npz(matrix_dir / TRAIN_EXCLUDE).tocsr(),
        blocked_items=inactive_items(matrix_dir),
        manifest=manifest,
    )


def matrix_id_types(matrix_dir: Path) -> IdTypes:
    """How the ids of this matrix build are published."""
    manifest = json.loads((matrix_dir / MANIFEST).read_text())
    if "id_types" not in manifest:
        raise InputError(f"{matrix_dir} was built by an older recsys without id types; run its matrix stage again")
    return IdTypes.from_dict(manifest["id_types"])
