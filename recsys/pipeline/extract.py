"""Extract stage: one time window of interactions from Postgres into Parquet, validated.

The bulk path is ``COPY (query) TO STDOUT`` piped straight into Arrow's streaming CSV reader
while it arrives (no temporary file of the CSV; parsing and validation overlap with the
transfer; a thread drains the COPY through psycopg2's C loop, see ``_drain_copy``). Valid rows
are spilled to time slices of the window as they come; once the COPY has ended, each slice
alone is deduplicated and appended to the Parquet output (by a thread, while the next slice is
deduplicated), so memory stays bounded by a block and two slices, not by the window.
A user id type left to infer is inferred from the same rows as they stream (see ``_Validator``).

Everything left out is counted and reported with examples in ``report.json`` and one WARNING
line: invalid rows (dropped), exact duplicates (collapsed into the first), and interactions on
products missing from the catalogue (kept, listed by product). The stage fails when nothing, or
too little, is valid.

Negative feedback (``negative_event_types``) is valid in the window like any weighted type; the
(user, product) pairs with negative feedback from before the window are extracted too
(``older_negatives.parquet``), so the matrix stage keeps excluding them for good.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property, reduce
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from recsys.core import db, ids
from recsys.core.errors import EmptyWindowError, NoValidDataError
from recsys.core.ids import IdTypes
from recsys.core.interaction_rules import NAN_VALUE, NEGATIVE_VALUE, NON_POSITIVE_PURCHASE, PURCHASE, absurd_value
from recsys.core.layout import EXTRACT_REPORT, INTERACTIONS, OLDER_NEGATIVES, PRODUCTS
from recsys.core.params import PipelineParams
from recsys.core.settings import Settings
from recsys.core.window import Window

log = logging.getLogger(__name__)

EXAMPLES_PER_REASON = 5
# products missing from the catalogue listed in the report (most interactions first); the log
# line names the first few
MISSING_PRODUCTS_LISTED = 20
MISSING_PRODUCTS_LOGGED = 5
# Blocks trail the COPY while it runs (once it ends, the last block and the slices' dedupe and
# Parquet write are left to do), and Arrow reads ahead several blocks when parsing falls behind:
# the stage's peak memory grows with the block (300,000 users x 6 M rows: 434 MB of RSS with 16
# MB blocks, 294-351 MB with 4 MB; docs/benchmarks.md).
CSV_BLOCK_BYTES = 4 << 20
# COPY hands over one row at a time: pass them through the pipe in MB-sized writes and reads
PIPE_BUFFER_BYTES = 1 << 20
# Dictionary pages where values repeat a lot. User ids have so many distinct values that the
# writer soon falls back to plain pages anyway, after hashing for about a quarter of the write.
PARQUET_DICTIONARY_COLUMNS = ["event_type", "product_id"]
# Min/max statistics of the numeric columns only: nothing reads the ids' (the matrix stage reads
# whole row groups), and computing them cost a fifth of the Parquet write.
PARQUET_STATISTICS_COLUMNS = ["value", "occurred_at"]

INTERACTION_CSV_COLUMNS = {
    "interaction_id": pa.int64(),
    "user_id": pa.string(),
    "product_id": pa.string(),
    "event_type": pa.string(),
    "value": pa.float64(),
    "occurred_at_us": pa.int64(),
}
PAIR_CSV_COLUMNS = {"user_id": pa.string(), "product_id": pa.string()}
PRODUCT_CSV_COLUMNS = {
    "product_id": pa.string(),
    "name": pa.string(),
    "category": pa.string(),
    "active": pa.bool_(),
    "attributes": pa.string(),  # JSON text: what content-based similarity reads (recsys.ml.content)
}
# Exact duplicates share occurred_at, so they always land in the same time slice of the window,
# wherever they are in the stream (a COPY has no order, and duplicates may be blocks apart). The
# slices are spilled as uncompressed Arrow IPC (cheap next to the Parquet write) and deduplicated
# one at a time: memory is bounded by the busiest slice (1/64 of the window when activity is
# even) instead of growing with the window as a set of every row seen would. Dedupe in the matrix
# stage was the alternative; here the count and examples land in this stage's report with the rest.
TIME_SLICES = 64
# Integer product ids are numbered through an array indexed by value (see _Products) while the
# largest is below this: 64 MiB at most, ids of a catalogue of a few million products
MAX_PRODUCT_VALUE_NUMBERS = 1 << 24
# Distinct integer user ids below this are flagged in an array by value (see _DistinctIntegers):
# 32 MiB at most, for shops whose user ids run up to 33 M
MAX_ID_VALUE_FLAGS = 1 << 25
DUPLICATE_KEY = ["user_id", "product_id", "event_type", "value", "occurred_at_us"]
FINGERPRINT = "fingerprint"  # column of the valid rows in their slices (see _Fingerprints)
DUPLICATE = "exact duplicate (same user_id, product_id, event_type, value and occurred_at as duplicate_of)"
INTERACTIONS_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("product_id", pa.string()),
        ("event_type", pa.string()),
        ("value", pa.float32()),
        ("occurred_at", pa.timestamp("us", tz="UTC")),
    ]
)


def _epoch_us(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


@dataclass
class ValidationReport:
    rows_read: int = 0
    rows_kept: int = 0  # rows written to the output
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict]] = field(default_factory=dict)
    # product_id -> kept interactions, for products missing from the catalogue
    missing_products: dict[str, int] = field(default_factory=dict)

    @property
    def rows_dropped(self) -> int:
        return self.rows_read - self.rows_kept

    @property
    def rows_invalid(self) -> int:
        """Dropped rows that were wrong, as opposed to repeated."""
        return self.rows_dropped - self.dropped.get(DUPLICATE, 0)

    def count_missing_products(self, product_ids: pa.ChunkedArray) -> None:
        for entry in pc.value_counts(product_ids).to_pylist():
            product_id = entry["values"]
            self.missing_products[product_id] = self.missing_products.get(product_id, 0) + entry["counts"]

    def top_missing_products(self, n: int) -> list[tuple[str, int]]:
        return sorted(self.missing_products.items(), key=lambda item: (-item[1], item[0]))[:n]

    def add_matching(self, reason: str, table: pa.Table, mask: pa.ChunkedArray) -> None:
        """``add(reason, table.filter(mask))`` without filtering a whole block once the reason
        has all its examples."""
        self.dropped[reason] = self.dropped.get(reason, 0) + pc.sum(mask).as_py()
        examples = self.examples.setdefault(reason, [])
        room = EXAMPLES_PER_REASON - len(examples)
        if room > 0:
            rows = table.take(pc.indices_nonzero(mask).slice(0, room))
            examples.extend(_json_safe(row) for row in rows.to_pylist())

    def rename(self, reason: str, new_reason: str) -> None:
        """``reason`` counted as ``new_reason``, in its place in the report's order."""
        if reason in self.dropped:
            self.dropped = {new_reason if key == reason else key: count for key, count in self.dropped.items()}
            self.examples = {new_reason if key == reason else key: rows for key, rows in self.examples.items()}

    def add(self, reason: str, rows: pa.Table) -> None:
        if rows.num_rows == 0:
            return
        self.dropped[reason] = self.dropped.get(reason, 0) + rows.num_rows
        examples = self.examples.setdefault(reason, [])
        room = EXAMPLES_PER_REASON - len(examples)
        if room > 0:
            examples.extend(_json_safe(row) for row in rows.slice(0, room).to_pylist())

    def summary(self) -> str:
        if not self.dropped:
            text = f"all {self.rows_read} rows valid"
        else:
            parts = []
            for reason, count in sorted(self.dropped.items(), key=lambda item: -item[1]):
                example = self.examples[reason][0]
                parts.append(f"{count} x {reason} (e.g. {_describe(example)})")
            text = f"dropped {self.rows_dropped} of {self.rows_read} rows: " + "; ".join(parts)
        if self.missing_products:
            top = self.top_missing_products(MISSING_PRODUCTS_LOGGED)
            named = ", ".join(f"{product_id!r} x {count}" for product_id, count in top)
            more = len(self.missing_products) - len(top)
            text += (
                f"; kept {sum(self.missing_products.values())} interactions on {len(self.missing_products)} "
                f"products missing from the catalogue (never recommended): {named}"
                + (f" and {more} more" if more else "")
            )
        return text

    def to_dict(self) -> dict:
        return {
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_dropped": self.rows_dropped,
            "rows_invalid": self.rows_invalid,
            "dropped": self.dropped,
            "examples": self.examples,
            "missing_from_catalogue": {
                "products": len(self.missing_products),
                "interactions": sum(self.missing_products.values()),
                "top": [
                    {"product_id": product_id, "interactions": count}
                    for product_id, count in self.top_missing_products(MISSING_PRODUCTS_LISTED)
                ],
            },
        }


def _json_safe(row: dict) -> dict:
    return {
        key: (repr(value) if isinstance(value, float) and not np.isfinite(value) else value)
        for key, value in row.items()
    }


def _describe(row: dict) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in row.items() if key != "occurred_at_us")


def _blank(strings: pa.ChunkedArray) -> pa.ChunkedArray:
    """Empty or whitespace only: the same rows as ``utf8_length(utf8_trim_whitespace(s)) == 0``
    (the same Unicode whitespace set, checked over every code point) without building a trimmed
    copy of every string."""
    return pc.or_(pc.utf8_is_space(strings), pc.equal(pc.binary_length(strings), 0))


def extracted_id_types(extract_dir: Path) -> IdTypes:
    """The id types an extract validated its rows against (from its report)."""
    return IdTypes.from_dict(json.loads((extract_dir / EXTRACT_REPORT).read_text())["id_types"])


def _given_id_type(settings: Settings, kind: str, live: dict | None) -> tuple[ids.IdType, str] | None:
    """(type, source) of ``kind`` ids when configured, else as the live version publishes them;
    None when the type is to be inferred (see ``recsys.ids``)."""
    configured = getattr(settings, f"{kind}_id_type")
    if configured is not None:
        return configured, f"configured (RECSYS_{kind.upper()}_ID_TYPE)"
    if live and kind in live:
        return live[kind], "as the live version publishes them"
    return None


def _inferred_id_type(integers: int, total: int, where: str) -> tuple[ids.IdType, str]:
    return ids.infer(integers, total), f"inferred: {integers} of {total} distinct {where} are integers"


def _product_id_type(settings: Settings, live: dict | None) -> tuple[ids.IdType, str]:
    """Given, else inferred from the catalogue."""
    if (given := _given_id_type(settings, "product", live)) is not None:
        return given
    with db.connect(settings) as conn:
        total, integers = conn.execute(db.sql_text(settings, "count_integer_product_ids")).fetchone()
    return _inferred_id_type(integers, total, "product ids in the catalogue")


class _DistinctUserIds:
    """The distinct user ids of the window's rows ('' and NULL left out), gathered block by block
    while the COPY streams, to infer the user id type from the window without reading it twice.

    Integer ids (``ids.integer_ids``: canonical, so one int64 value per id text) are counted by
    value (``_DistinctIntegers``) and the others gathered as strings, hashed: a pass over a
    block's int64 values costs a fraction of hashing their text, and shops with integer ids are
    the common case. Block strings wait in a list, merged into the ones seen so far once they
    outnumber them: memory stays within a few times the distinct ids."""

    def __init__(self, window: Window):
        self._start_us, self._end_us = _epoch_us(window.start), _epoch_us(window.end)
        self._integers = _DistinctIntegers()
        self._others = _Distinct(pa.array([], pa.string()), lambda values: pc.unique(pa.chunked_array(values, pa.string())))

    def add(self, table: pa.Table, not_integer: pa.ChunkedArray, values: pa.ChunkedArray) -> None:
        """``not_integer``: the block's ``not ids.integer_ids(user_id)``, false for NULL;
        ``values``: the user ids' int64 values (``ids.integer_id_values``)."""
        occurred_at_us, user_ids = table["occurred_at_us"], table["user_id"]
        # the window's bounds again: an adapted query may return rows outside it
        counted = pc.and_(
            pc.and_(pc.greater_equal(occurred_at_us, self._start_us), pc.less(occurred_at_us, self._end_us)),
            pc.and_(pc.is_valid(user_ids), pc.not_equal(user_ids, "")),
        )
        counted = _null_as_false(counted)
        self._integers.add(values.filter(pc.and_not(counted, not_integer)).to_numpy())
        others = user_ids.filter(pc.and_(counted, not_integer))
        if len(others):
            self._others.add(pc.unique(others))

    def id_type(self) -> tuple[ids.IdType, str]:
        integers = self._integers.count()
        total = integers + len(self._others.values())
        return _inferred_id_type(integers, total, "user ids in the window")


def _sorted_distinct(values: np.ndarray) -> np.ndarray:
    """``np.unique(values)`` by numpy's vectorised sort (numpy 2.4's ``unique`` of int64 costs
    seven times as much)."""
    return _distinct_of_sorted(np.sort(values))


def _distinct_of_sorted(ordered: np.ndarray) -> np.ndarray:
    return ordered[np.concatenate([[True], ordered[1:] != ordered[:-1]])] if len(ordered) else ordered


class _Distinct:
    """Distinct values gathered from blocks of distinct values (see ``_DistinctUserIds``)."""

    def __init__(self, empty, union: Callable):
        self._seen, self._union = empty, union
        self._pending: list = []
        self._pending_count = 0

    def add(self, block_values) -> None:
        self._pending.append(block_values)
        self._pending_count += len(block_values)
        if self._pending_count > len(self._seen):
            self._merge()

    def _merge(self) -> None:
        if self._pending:
            self._seen = self._union([self._seen, *self._pending])
        self._pending, self._pending_count = [], 0

    def values(self):
        self._merge()
        return self._seen


class _DistinctIntegers:
    """How many distinct int64 values the blocks hold. Those in [0, MAX_ID_VALUE_FLAGS) are
    flagged in an array indexed by value (one pass per block; shops number their users from 1),
    the others sorted and merged (``_Distinct``)."""

    def __init__(self):
        self._seen = np.zeros(0, np.bool_)
        self._others = _Distinct(np.array([], np.int64), lambda values: _sorted_distinct(np.concatenate(values)))

    def add(self, values: np.ndarray) -> None:
        if len(values) == 0:
            return
        if values.min() < 0 or values.max() >= MAX_ID_VALUE_FLAGS:
            in_range = (values >= 0) & (values < MAX_ID_VALUE_FLAGS)
            self._others.add(_sorted_distinct(values[~in_range]))
            values = values[in_range]
            if len(values) == 0:
                return
        self._seen = _covering(self._seen, int(values.max()), MAX_ID_VALUE_FLAGS, False)
        self._seen[values] = True

    def count(self) -> int:
        return int(np.count_nonzero(self._seen)) + len(self._others.values())


def _covering(by_value: np.ndarray, top: int, limit: int, fill) -> np.ndarray:
    """``by_value`` (an array indexed by value), grown with ``fill`` to cover ``top`` (< ``limit``):
    to the next power of two, so that it grows a few times only."""
    if top < len(by_value):
        return by_value
    grown = np.full(min(limit, 1 << top.bit_length()), fill, by_value.dtype)
    grown[: len(by_value)] = by_value
    return grown


def _not_integer_reason(kind: str, source: str) -> str:
    return f"{kind}_id not an integer ({kind} ids are int: {source})"


# the user id rule's reason while the user id type is inferred from the rows being validated
PENDING_USER_ID_RULE = "user_id not an integer (pending)"


def _validation_rules(
    params: PipelineParams, known_event_types: pa.Array, latest: datetime, int_id_reasons: dict[str, str]
) -> list[tuple[str, callable]]:
    """(reason, predicate) pairs; a row is dropped for the first predicate it matches. Each
    predicate takes a ``_Block``. ``int_id_reasons``: the reason for each kind of id that must be an integer.

    ``latest`` is the last valid instant: the window's last microsecond, or the extract's clock
    when the window ends later. The query itself stops at the window end; the check also holds
    for a shop's adapted query that forgets to."""
    latest_us = _epoch_us(latest)
    typed = {
        "user": lambda t: pc.invert(t.user_integers[0]),
        # product ids repeat: checked once per distinct id (see _Products)
        "product": lambda t: t.per_product(t.products.not_integer),
    }
    return [
        ("null user_id", lambda t: pc.is_null(t["user_id"])),
        ("empty user_id", lambda t: _blank(t["user_id"])),
        ("null product_id", lambda t: pc.is_null(t["product_id"])),
        ("empty product_id", lambda t: t.per_product(t.products.blank)),
        *((int_id_reasons[kind], typed[kind]) for kind in ("user", "product") if kind in int_id_reasons),
        (
            # is_in is false (not null) for a null event_type, so that row counts as unknown
            f"unknown event_type (known: {', '.join(known_event_types.to_pylist())})",
            lambda t: pc.invert(pc.is_in(t["event_type"], value_set=known_event_types)),
        ),
        # the same reasons, in the same order, as interaction_rules.value_problem (the events API)
        (NAN_VALUE, lambda t: pc.is_nan(t["value"])),
        (NEGATIVE_VALUE, lambda t: pc.less(t["value"], 0)),
        (
            NON_POSITIVE_PURCHASE,
            lambda t: pc.and_(pc.equal(t["event_type"], PURCHASE), pc.less_equal(t["value"], 0)),
        ),
        (absurd_value(params.max_value), lambda t: pc.greater(t["value"], params.max_value)),
        (
            f"occurred_at after the window end or in the future (> {latest.isoformat()})",
            lambda t: pc.greater(t["occurred_at_us"], latest_us),
        ),
    ]


def _null_as_false(mask: pa.ChunkedArray) -> pa.ChunkedArray:
    """``fill_null(mask, False)``, in a fraction of its time on booleans (null AND false is false)."""
    return pc.and_kleene(mask, pc.is_valid(mask))


def _attribute(table: pa.Table, reasons: list[str], matches: list[pa.ChunkedArray], report: ValidationReport):
    """Count the rows that match a rule (and keep examples) under the first one they match;
    returns the mask of those rows, None when there are none (the common case: one ``any``)."""
    report.rows_read += table.num_rows
    invalid = reduce(pc.or_, matches)
    if not pc.any(invalid).as_py():
        return None
    counted = pa.array(np.zeros(table.num_rows, dtype=bool))
    for reason, match in zip(reasons, matches, strict=True):
        first_match = pc.and_not(match, counted)
        if pc.any(first_match).as_py():
            report.add_matching(reason, table, first_match)
            counted = pc.or_(counted, first_match)
    return invalid


class _Products:
    """The distinct product ids of the window's rows so far, numbered in order of first
    appearance, with what validation and the report need of each product computed once for it
    instead of once per row (a window has far more rows than products): blank, not an integer,
    missing from the catalogue. The same numbers enter the rows' fingerprints.

    A block of canonical integer ids (a shop of integer ids: the common case) finds its numbers
    in an array indexed by id value: Arrow's ``index_in`` hashes every id seen so far again for
    each block, which at 100,000 products cost more than parsing the block (docs/benchmarks.md).
    Other blocks are looked up by text; both ways give each id the same number."""

    def __init__(self, catalogue: pa.ChunkedArray):
        self._catalogue = catalogue
        self._new_ids: list[pa.Array] = []  # numbered after self._ids, not yet concatenated to it
        self._ids = pa.array([], pa.string())
        self.blank = self.not_integer = pa.array([], pa.bool_())
        # number of each canonical integer id seen, by value (-1: not seen); grown as needed
        self._number_of_value = np.full(0, -1, np.int32)

    @property
    def ids(self) -> pa.Array:
        """Every product id seen, by number."""
        if self._new_ids:
            self._ids = pa.concat_arrays([self._ids, *self._new_ids])
            self._new_ids = []
        return self._ids

    @property
    def count(self) -> int:
        return len(self._ids) + sum(len(chunk) for chunk in self._new_ids)

    @property
    def missing(self) -> pa.Array:
        """Per product: missing from the catalogue (only the report asks, once)."""
        return pc.invert(pc.is_in(self.ids, value_set=self._catalogue))

    def codes(self, product_ids: pa.ChunkedArray) -> pa.ChunkedArray:
        """Each row's product number (null for a null product_id)."""
        product_ids = product_ids.combine_chunks()  # one block: one chunk, not copied
        values = self._integer_values(product_ids)
        codes = self._codes_by_value(values) if values is not None else self._codes_by_text(product_ids)
        return pa.chunked_array([codes])

    def _integer_values(self, product_ids: pa.Array) -> np.ndarray | None:
        """The ids' values when every id of the block is a canonical integer in the range the
        array by value covers, else None."""
        if product_ids.null_count or len(product_ids) == 0:
            return None
        try:
            values = pc.cast(product_ids, pa.int64())
        except pa.ArrowInvalid:
            return None
        bounds = pc.min_max(values)
        if bounds["min"].as_py() < 0 or bounds["max"].as_py() >= MAX_PRODUCT_VALUE_NUMBERS:
            return None
        # Arrow's parser takes "007" and "0x5": canonical ids start with 0 only when they are "0"
        if pc.any(pc.starts_with(product_ids, "0")).as_py() and pc.any(
            pc.and_(pc.starts_with(product_ids, "0"), pc.greater(pc.binary_length(product_ids), 1))
        ).as_py():
            return None
        return values.to_numpy()

    def _codes_by_value(self, values: np.ndarray) -> pa.Array:
        self._cover(int(values.max()))
        codes = self._number_of_value[values]
        unseen = codes < 0
        if unseen.any():
            unseen_values, first_rows = np.unique(values[unseen], return_index=True)
            new_values = unseen_values[np.argsort(first_rows)]  # numbered in order of appearance
            self._number_of_value[new_values] = np.arange(self.count, self.count + len(new_values), dtype=np.int32)
            # canonical integers below 2**24: the ids' own text, and every one an integer id
            self._add(pc.cast(pa.array(new_values), pa.string()), pa.array(np.ones(len(new_values), np.bool_)))
            codes = self._number_of_value[values]
        return pa.array(codes)

    def _codes_by_text(self, product_ids: pa.Array) -> pa.Array:
        codes = pc.index_in(product_ids, value_set=self.ids)
        if codes.null_count > product_ids.null_count:  # products not seen in earlier blocks
            unseen = pc.and_(pc.is_null(codes), pc.is_valid(product_ids))
            unseen_ids = product_ids.filter(unseen)
            new = pc.unique(unseen_ids)
            # numbered after the ones seen: only the unseen rows are looked up again
            new_codes = pc.cast(pc.add(pc.index_in(unseen_ids, value_set=new), self.count), pa.int32())
            codes = pc.replace_with_mask(codes, unseen, new_codes)
            # the integer ids among them keep their numbers for blocks looked up by value
            integer, values = ids.integer_id_values(new)
            by_value = pc.and_(pc.and_(integer, pc.greater_equal(values, 0)), pc.less(values, MAX_PRODUCT_VALUE_NUMBERS))
            numbered_values = values.filter(by_value).to_numpy()
            if len(numbered_values):
                self._cover(int(numbered_values.max()))
                self._number_of_value[numbered_values] = (
                    np.flatnonzero(by_value.to_numpy(zero_copy_only=False)).astype(np.int32) + self.count
                )
            self._add(new, integer)
        return codes

    def _cover(self, top: int) -> None:
        self._number_of_value = _covering(self._number_of_value, top, MAX_PRODUCT_VALUE_NUMBERS, -1)

    def _add(self, new: pa.Array, integer: pa.Array) -> None:
        """Number ``new`` ids (distinct, unseen) after the ones seen; ``integer``: their
        ``ids.integer_ids``, which each lookup has at hand."""
        self._new_ids.append(new)
        self.blank = pa.concat_arrays([self.blank, _blank(new)])
        self.not_integer = pa.concat_arrays([self.not_integer, pc.invert(integer)])

    def missing_ids(self) -> pa.Array:
        return self.ids.filter(self.missing)


@dataclass
class _Block:
    """One block of the COPY as the validation rules read it: its columns, and per-product
    facts looked up by each row's product number."""

    table: pa.Table
    products: _Products
    product_codes: pa.ChunkedArray

    def __getitem__(self, column: str) -> pa.ChunkedArray:
        return self.table[column]

    def per_product(self, flags: pa.Array) -> pa.ChunkedArray:
        """Each row's product's flag (null for a null product_id)."""
        return pc.take(flags, self.product_codes)

    @cached_property
    def user_integers(self) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
        """``ids.integer_id_values`` of the user ids: parsed once for the user id rule, the
        distinct user ids and the fingerprints."""
        return ids.integer_id_values(self["user_id"])

    def user_keys(self) -> pa.ChunkedArray:
        """A number per row's user id for the fingerprints: its value when it is an integer, else
        its length (null for a null user_id)."""
        integer, values = self.user_integers
        return pc.if_else(_null_as_false(integer), values, pc.cast(pc.binary_length(self["user_id"]), pa.int64()))


# spilled beside the rows while the user id type is pending: valid unless user ids are int
USER_ID_NOT_INTEGER = "user_id_not_integer"


class _Validator:
    """Validates blocks: each rule's mask is computed once per block.

    When the user id type is inferred from the window itself (``user_id_rule_pending``), it is
    known only once every block has been read. Each block is then attributed twice, once with
    the user id rule and once without, each into its own report: a row's first matching rule
    depends on it. Rows valid but for a user id that is not an integer are returned flagged
    (USER_ID_NOT_INTEGER), to be dropped later if the user ids turn out to be int."""

    def __init__(self, rules: list[tuple[str, callable]], user_id_rule_pending: bool):
        self._reasons = [reason for reason, _ in rules]
        self._predicates = [predicate for _, predicate in rules]
        self.report = ValidationReport()
        self._user_rule = self._reasons.index(PENDING_USER_ID_RULE) if user_id_rule_pending else None
        self.report_if_user_ids_are_str = ValidationReport() if user_id_rule_pending else None
        # the last block's rows whose user id is not an integer, while the user id rule is pending
        self.user_id_not_integer: pa.ChunkedArray | None = None

    def validate(self, block: _Block) -> tuple[pa.Table, pa.ChunkedArray | None]:
        """The block's valid rows, and the mask that selects them from the block (None: all)."""
        table = block.table
        matches = [_null_as_false(predicate(block)) for predicate in self._predicates]
        invalid = _attribute(table, self._reasons, matches, self.report)
        if self._user_rule is None:
            return (table, None) if invalid is None else _kept(table, invalid)
        not_integer = self.user_id_not_integer = matches[self._user_rule]
        others = [match for index, match in enumerate(matches) if index != self._user_rule]
        reasons = [reason for index, reason in enumerate(self._reasons) if index != self._user_rule]
        invalid = _attribute(table, reasons, others, self.report_if_user_ids_are_str)
        flagged = table.append_column(USER_ID_NOT_INTEGER, not_integer)
        return (flagged, None) if invalid is None else _kept(flagged, invalid)

    def final_report(self, user_id_type: ids.IdType, user_id_rule: str) -> ValidationReport:
        """The report of the rules that apply, once the pending user id type is known."""
        if self._user_rule is None:
            return self.report
        if user_id_type == "str":
            return self.report_if_user_ids_are_str
        self.report.rename(PENDING_USER_ID_RULE, user_id_rule)
        return self.report


def _kept(table: pa.Table, invalid: pa.ChunkedArray) -> tuple[pa.Table, pa.ChunkedArray]:
    valid = pc.invert(invalid)
    return table.filter(valid), valid


def _mix(hashes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Fold 64-bit ``values`` into running row hashes (multiply-xorshift; wraps around)."""
    hashes = (hashes ^ values.astype(np.uint64, copy=False)) * np.uint64(0x9E3779B97F4A7C15)
    return hashes ^ (hashes >> np.uint64(29))


class _Fingerprints:
    """Each valid row's fingerprint, computed while the COPY streams (the reading thread mostly
    waits for it then) so that the dedupe after it only compares them: equal rows always share a
    fingerprint, different rows rarely do (they only cost an exact comparison). user_id enters by
    ``_Block.user_keys`` when the extract parses the user ids as integers anyway (their value;
    rows of users whose ids have the same length no longer share fingerprints), else by its
    length alone: hashing a column of that many distinct strings costs more than the
    comparisons it saves. Product ids (see _Products) and event types enter by a number the same
    in every block."""

    def __init__(self, event_types: pa.Array):
        self._event_types = event_types

    def of(self, table: pa.Table, product_codes: pa.ChunkedArray, user_keys: pa.ChunkedArray | None) -> pa.Array:
        """Of valid rows only: their product ids and event types are not null.
        ``product_codes``: the rows' product numbers (``_Products.codes``); ``user_keys``: the
        rows' ``_Block.user_keys``, the same choice for every block of an extract (None: the
        user ids' lengths)."""
        fingerprints = np.zeros(table.num_rows, np.uint64)
        fingerprints = _mix(fingerprints, product_codes.to_numpy())
        fingerprints = _mix(fingerprints, pc.index_in(table["event_type"], value_set=self._event_types).to_numpy())
        user_keys = pc.binary_length(table["user_id"]) if user_keys is None else user_keys
        fingerprints = _mix(fingerprints, user_keys.to_numpy())
        values = pc.fill_null(table["value"], np.nan).to_numpy()  # NULL and NaN: NaN rows are dropped already
        fingerprints = _mix(fingerprints, values.view(np.uint64))
        fingerprints = _mix(fingerprints, table["occurred_at_us"].to_numpy().view(np.uint64))
        return pa.array(fingerprints)


def _repeated(values: np.ndarray) -> np.ndarray:
    """The values that occur more than once, each once. Sorting (numpy's vectorised sort) costs
    an eighth of hashing them with ``pc.value_counts`` (0.05 against 0.37 CPU-s for 5.8 M)."""
    ordered = np.sort(values)
    return _distinct_of_sorted(ordered[1:][ordered[1:] == ordered[:-1]])  # sorted already


def _collapse_duplicates(table: pa.Table, report: ValidationReport) -> pa.Table:
    """``table`` with each exact duplicate (all of DUPLICATE_KEY equal; NULL equals NULL) removed
    but for its first interaction; the removed ones are counted, with the id they repeat. Rows
    may have a duplicate only where their FINGERPRINT does."""
    fingerprints = table[FINGERPRINT]
    repeated = pa.array(_repeated(fingerprints.to_numpy()))
    if len(repeated) == 0:
        return table
    groups = (
        table.filter(pc.is_in(fingerprints, value_set=repeated))
        .group_by(DUPLICATE_KEY, use_threads=False)
        .aggregate([("interaction_id", "min"), ("interaction_id", "list")])
    )
    ids = groups["interaction_id_list"].combine_chunks()
    group_of_id = pc.list_parent_indices(ids)
    copies = pa.table(
        {
            "interaction_id": ids.flatten(),
            "duplicate_of": pc.take(groups["interaction_id_min"], group_of_id),
            **{name: pc.take(groups[name], group_of_id) for name in DUPLICATE_KEY},
        }
    )
    copies = copies.filter(pc.not_equal(copies["interaction_id"], copies["duplicate_of"]))
    if copies.num_rows == 0:
        return table
    report.add(DUPLICATE, copies.sort_by("interaction_id"))
    return table.filter(pc.invert(pc.is_in(table["interaction_id"], value_set=copies["interaction_id"])))


def _to_output(table: pa.Table) -> pa.Table:
    return pa.table(
        {
            "user_id": table["user_id"],
            "product_id": table["product_id"],
            "event_type": table["event_type"],
            "value": pc.cast(table["value"], pa.float32()),
            "occurred_at": pc.cast(table["occurred_at_us"], pa.timestamp("us", tz="UTC")),
        },
        schema=INTERACTIONS_SCHEMA,
    )


def _drain_copy(
    settings: Settings, statement: str, params: dict, sink_fd: int, failures: list[BaseException]
) -> None:
    """Thread body: the rows of ``COPY ... TO STDOUT`` into the pipe ``sink_fd``, which is closed
    at the end either way; a failure goes into ``failures`` for the reading thread to raise.

    ``db.copy_to`` drains through psycopg2's C loop (a Python loop over libpq's rows cost the
    drain half as much CPU again, on the two cores it shares with the parsing thread and
    PostgreSQL), with the errors of psycopg 3."""
    try:
        with open(sink_fd, "wb", buffering=PIPE_BUFFER_BYTES) as sink:
            db.copy_to(settings, statement, params, sink)
    except BaseException as error:  # noqa: BLE001 - handed over to the reader, who raises it
        failures.append(error)


@contextmanager
def _copy_stream(settings: Settings, statement: str, params: dict) -> Iterator[io.BufferedReader]:
    """The output of ``COPY ... TO STDOUT`` as a readable stream while it arrives.

    A thread drains the COPY into a pipe (psycopg2 releases the GIL while it waits for each row)
    and the caller reads the other end, so parsing overlaps the transfer. Leaving the block joins
    the thread and raises the COPY's error if it failed: a stream that ended early because the
    COPY died is never taken for the whole result.
    """
    read_fd, write_fd = os.pipe()
    failures: list[BaseException] = []
    with open(read_fd, "rb", buffering=PIPE_BUFFER_BYTES) as source:
        drainer = threading.Thread(
            target=_drain_copy, args=(settings, statement, params, write_fd, failures), name="extract-copy"
        )
        try:
            drainer.start()
        except BaseException:
            os.close(write_fd)
            raise
        try:
            yield source
        except BaseException as reading_error:
            # Closing our end makes a drainer blocked on a full pipe fail with BrokenPipeError
            # instead of waiting forever for a reader that is gone.
            source.close()
            drainer.join()
            if failures and not isinstance(failures[0], BrokenPipeError):
                # the COPY failed on its own, not because we stopped reading
                raise failures[0] from reading_error
            raise
    drainer.join()
    if failures:
        raise failures[0]


def _csv_batches(source: io.BufferedReader, columns: dict[str, pa.DataType]) -> Iterator[pa.RecordBatch]:
    """Record batches of a headerless COPY CSV stream; none for an empty one (Arrow refuses it)."""
    if not source.peek(1):
        return
    yield from pacsv.open_csv(
        source,
        read_options=pacsv.ReadOptions(column_names=list(columns), block_size=CSV_BLOCK_BYTES),
        # only an unquoted empty field is NULL: COPY writes NULL that way, '' as "" and NaN as NaN
        convert_options=pacsv.ConvertOptions(
            column_types=columns,
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
            true_values=["t"],
            false_values=["f"],
        ),
    )


class _TimeSlices:
    """Rows spilled to one Arrow IPC stream file per time slice of the window, read back one
    slice at a time (see TIME_SLICES)."""

    def __init__(self, directory: Path, window: Window, schema: pa.Schema, count: int = TIME_SLICES):
        self._start_us = _epoch_us(window.start)
        self._span_us = _epoch_us(window.end) - self._start_us
        self._schema = schema
        self._paths = [directory / f"slice-{index:03d}.arrow" for index in range(count)]
        self._writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        offsets = table["occurred_at_us"].to_numpy() - self._start_us
        # rows outside the window are dropped by validation; the clip only keeps an index in range
        slices = np.clip(offsets * len(self._paths) // self._span_us, 0, len(self._paths) - 1)
        bounds = np.concatenate([[0], np.cumsum(np.bincount(slices, minlength=len(self._paths)))])
        if _in_time_order(slices):
            ordered = table  # each slice's rows are a run of the block already: no copy to sort them
        else:
            # small unsigned ints: numpy's stable sort is then a radix sort, linear in the rows
            ordered = table.take(np.argsort(slices.astype(np.min_scalar_type(len(self._paths) - 1)), kind="stable"))
        for index in np.flatnonzero(np.diff(bounds)):
            if index not in self._writers:
                self._writers[index] = pa.ipc.new_stream(str(self._paths[index]), self._schema)
            self._writers[index].write_table(ordered.slice(bounds[index], bounds[index + 1] - bounds[index]))

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()

    def read_each(self) -> Iterator[pa.Table]:
        """Each written slice in time order, once closed; its file is removed once the next one
        is asked for."""
        for index in sorted(self._writers):
            with pa.OSFile(str(self._paths[index])) as source:
                table = pa.ipc.open_stream(source).read_all()
            yield table
            del table  # the caller's slice is freed before the next one is read
            self._paths[index].unlink()


def _in_time_order(slices: np.ndarray) -> bool:
    """Whether the rows' slice numbers never go down (a table appended to in time order and read
    in its physical order gives such blocks)."""
    return bool((slices[1:] >= slices[:-1]).all())


@dataclass(frozen=True)
class ExtractResult:
    extract_dir: Path
    interactions: Path
    products: Path
    older_negatives: Path
    report: Path
    rows_read: int
    rows_kept: int


def extract(
    settings: Settings,
    window: Window,
    extract_dir: Path,
    params: PipelineParams,
    progress: bool = False,
    live_id_types: dict | None = None,
) -> ExtractResult:
    """Read interactions in ``window`` and the product catalogue; write validated Parquet.
    ``live_id_types``: the live version's id types, which ids keep unless configured otherwise."""
    extract_dir.mkdir(parents=True, exist_ok=True)
    interactions_path, products_path = extract_dir / INTERACTIONS, extract_dir / PRODUCTS
    older_negatives_path = extract_dir / OLDER_NEGATIVES
    # all appear under their names only once the whole extract has succeeded
    tmp_path, products_tmp_path, older_negatives_tmp_path = (
        path.with_suffix(".parquet.part") for path in (interactions_path, products_path, older_negatives_path)
    )
    window_text = f"[{window.start.isoformat()}, {window.end.isoformat()})"
    query_params = {"start": window.start, "end": window.end}
    latest = min(window.end - timedelta(microseconds=1), datetime.now(UTC))
    user_id_type = _given_id_type(settings, "user", live_id_types)
    product_id_type = _product_id_type(settings, live_id_types)
    # a user id type left to infer is inferred from the window's rows as they stream
    int_id_reasons = {
        kind: PENDING_USER_ID_RULE if known is None else _not_integer_reason(kind, known[1])
        for kind, known in (("user", user_id_type), ("product", product_id_type))
        if known is None or known[0] == "int"
    }
    known_event_types = pa.array(sorted({*params.event_weights, *params.negative_event_types}), pa.string())
    validator = _Validator(
        _validation_rules(params, known_event_types, latest, int_id_reasons), user_id_rule_pending=user_id_type is None
    )
    window_user_ids = _DistinctUserIds(window) if user_id_type is None else None
    columns = (
        INTERACTION_CSV_COLUMNS
        | ({USER_ID_NOT_INTEGER: pa.bool_()} if user_id_type is None else {})
        | {FINGERPRINT: pa.uint64()}
    )
    try:
        # the catalogue first (small next to the window): each product's rows are then checked
        # against it once per product while the window streams
        products = _Products(_extract_products(settings, products_tmp_path)["product_id"])
        with tempfile.TemporaryDirectory(prefix=".slices-", dir=extract_dir) as slices_dir:
            slices = _TimeSlices(Path(slices_dir), window, pa.schema(columns.items()))
            _spill_valid_rows(
                settings, query_params, validator, window_user_ids, products, _Fingerprints(known_event_types),
                "user" in int_id_reasons, slices, progress,
            )
            if validator.report.rows_read == 0:
                raise EmptyWindowError(
                    f"no interactions in {settings.db_schema}.interactions with occurred_at in {window_text}"
                )
            if window_user_ids is not None:
                user_id_type = window_user_ids.id_type()
            report = validator.final_report(user_id_type[0], _not_integer_reason("user", user_id_type[1]))
            _write_deduplicated(slices, products.missing_ids(), tmp_path, report, drop_flagged=user_id_type[0] == "int")
        _check_enough_valid(report, params, window_text)
        older_negatives = _extract_older_negatives(settings, window, params, older_negatives_tmp_path)
    except BaseException:
        for path in (tmp_path, products_tmp_path, older_negatives_tmp_path):
            path.unlink(missing_ok=True)
        raise
    tmp_path.replace(interactions_path)
    products_tmp_path.replace(products_path)
    older_negatives_tmp_path.replace(older_negatives_path)
    id_types = IdTypes(
        user_id_type[0], product_id_type[0], {"user": user_id_type[1], "product": product_id_type[1]}
    )

    report_path = extract_dir / EXTRACT_REPORT
    report_path.write_text(
        json.dumps(
            {"window": window.to_dict(), "id_types": id_types.to_dict(), "interactions": report.to_dict(),
             "older_negative_pairs": older_negatives},
            indent=2,
        )
    )
    log.info(
        "extract %s: kept %d of %d rows; %d negative feedback pairs from before the window",
        window_text, report.rows_kept, report.rows_read, older_negatives,
    )
    return ExtractResult(
        extract_dir=extract_dir,
        interactions=interactions_path,
        products=products_path,
        older_negatives=older_negatives_path,
        report=report_path,
        rows_read=report.rows_read,
        rows_kept=report.rows_kept,
    )


def _spill_valid_rows(
    settings: Settings,
    query_params: dict,
    validator: _Validator,
    window_user_ids: _DistinctUserIds | None,
    products: _Products,
    fingerprints: _Fingerprints,
    by_user_value: bool,
    slices: _TimeSlices,
    progress: bool,
) -> None:
    """Stream the window's COPY, validate each block and spill the valid rows to ``slices``;
    gather the window's user ids when their type is to be inferred."""
    try:
        with (
            _copy_stream(settings, db.sql_text(settings, "extract_interactions"), query_params) as source,
            tqdm(desc="extract interactions", unit="row", unit_scale=True, disable=not progress) as bar,
        ):
            for batch in _csv_batches(source, INTERACTION_CSV_COLUMNS):
                table = pa.Table.from_batches([batch])
                block = _Block(table, products, products.codes(table["product_id"]))
                valid, kept = validator.validate(block)
                if window_user_ids is not None:
                    window_user_ids.add(table, validator.user_id_not_integer, block.user_integers[1])
                # the user ids are parsed as integers when their rule applies: then their values
                # enter the fingerprints
                user_keys = block.user_keys() if by_user_value else None
                valid_codes, user_keys = (
                    (block.product_codes, user_keys) if kept is None
                    else (block.product_codes.filter(kept), None if user_keys is None else user_keys.filter(kept))
                )
                slices.write(valid.append_column(FINGERPRINT, fingerprints.of(valid, valid_codes, user_keys)))
                bar.update(batch.num_rows)
    finally:
        slices.close()


def _write_deduplicated(
    slices: _TimeSlices, missing_products: pa.Array, path: Path, report: ValidationReport, drop_flagged: bool
) -> None:
    """Each slice without its duplicates into the Parquet output; interactions on
    ``missing_products`` (the window's products missing from the catalogue) counted on the rows
    kept. ``drop_flagged``: leave out the rows flagged
    USER_ID_NOT_INTEGER (their user ids turned out to be int), counted as invalid already.

    A thread writes each slice while the next one is read and deduplicated: the Parquet writer
    releases the GIL, and once the COPY has ended the second core is free for it."""
    with (
        pq.ParquetWriter(
            path, INTERACTIONS_SCHEMA, use_dictionary=PARQUET_DICTIONARY_COLUMNS,
            write_statistics=PARQUET_STATISTICS_COLUMNS,
        ) as writer,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="extract-parquet") as parquet_thread,
    ):
        written = None
        for table in slices.read_each():
            if drop_flagged and USER_ID_NOT_INTEGER in table.column_names and pc.any(table[USER_ID_NOT_INTEGER]).as_py():
                table = table.filter(pc.invert(table[USER_ID_NOT_INTEGER]))
            kept = _collapse_duplicates(table, report)
            if len(missing_products):
                report.count_missing_products(
                    kept["product_id"].filter(pc.is_in(kept["product_id"], value_set=missing_products))
                )
            report.rows_kept += kept.num_rows
            output = _to_output(kept)
            del table, kept  # or they would stay alive while the next slice is read
            if written is not None:
                written.result()  # one slice in the writer at a time: memory holds two, not all
            written = parquet_thread.submit(writer.write_table, output)
            del output  # the thread holds it until written
        if written is not None:
            written.result()


def _check_enough_valid(report: ValidationReport, params: PipelineParams, window_text: str) -> None:
    """Log what was dropped or is missing (one WARNING line); raise when nothing, or too little,
    is left to train on. Collapsed duplicates do not count as invalid: their first copy is kept."""
    if report.dropped or report.missing_products:
        log.warning("extract %s: %s", window_text, report.summary())
    if report.rows_kept == 0:
        raise NoValidDataError(f"no valid interactions in {window_text}: {report.summary()}")
    invalid_fraction = report.rows_invalid / report.rows_read
    if invalid_fraction > params.max_invalid_fraction:
        raise NoValidDataError(
            f"{invalid_fraction:.1%} of interactions in {window_text} are invalid, more than "
            f"max_invalid_fraction={params.max_invalid_fraction:.1%}: {report.summary()}"
        )


def _extract_products(settings: Settings, path: Path) -> pa.Table:
    """Snapshot the catalogue into ``path``: publish needs each product's active flag and
    category (and, for new products, name and attributes), and the extract which interactions'
    products are missing from it."""
    with _copy_stream(settings, db.sql_text(settings, "extract_products"), {}) as source:
        batches = list(_csv_batches(source, PRODUCT_CSV_COLUMNS))
    products = pa.Table.from_batches(batches, schema=pa.schema(PRODUCT_CSV_COLUMNS.items()))
    pq.write_table(products, path)
    return products


def _extract_older_negatives(settings: Settings, window: Window, params: PipelineParams, path: Path) -> int:
    """The distinct (user, product) pairs with negative feedback before the window into ``path``;
    returns how many."""
    query_params = {"start": window.start, "event_types": list(params.negative_event_types)}
    with _copy_stream(settings, db.sql_text(settings, "extract_older_negatives"), query_params) as source:
        batches = list(_csv_batches(source, PAIR_CSV_COLUMNS))
    pairs = pa.Table.from_batches(batches, schema=pa.schema(PAIR_CSV_COLUMNS.items()))
    pq.write_table(pairs, path)
    return pairs.num_rows
