"""Extract stage: one time window of interactions from Postgres into Parquet, validated.

The bulk path is ``COPY (query) TO STDOUT`` piped straight into Arrow's streaming CSV reader
while it arrives (no temporary file; parsing, validation and the Parquet write overlap with the
transfer), so memory stays bounded by the block size, not by the window. Bad rows are counted,
dropped and reported with examples; the stage fails when nothing (or too little) is left.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import reduce
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from recsys import db
from recsys.errors import EmptyWindowError, NoValidDataError
from recsys.params import PipelineParams
from recsys.settings import Settings

log = logging.getLogger(__name__)

EXAMPLES_PER_REASON = 5
# Blocks trail the COPY while it runs; the last one is all that is left to do once it ends, and
# Arrow reads ahead several blocks when parsing falls behind.
CSV_BLOCK_BYTES = 16 << 20
# COPY hands over one row at a time: pass them through the pipe in MB-sized writes and reads
PIPE_BUFFER_BYTES = 1 << 20
# Dictionary pages where values repeat a lot. User ids have so many distinct values that the
# writer soon falls back to plain pages anyway, after hashing for about a quarter of the write.
PARQUET_DICTIONARY_COLUMNS = ["event_type", "product_id"]

INTERACTION_CSV_COLUMNS = {
    "interaction_id": pa.int64(),
    "user_id": pa.string(),
    "product_id": pa.string(),
    "event_type": pa.string(),
    "value": pa.float64(),
    "occurred_at_us": pa.int64(),
}
PRODUCT_CSV_COLUMNS = {
    "product_id": pa.string(),
    "name": pa.string(),
    "category": pa.string(),
    "active": pa.bool_(),
}
INTERACTIONS_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("product_id", pa.string()),
        ("event_type", pa.string()),
        ("value", pa.float32()),
        ("occurred_at", pa.timestamp("us", tz="UTC")),
    ]
)


@dataclass(frozen=True)
class Window:
    """A half-open time window [start, end) in UTC."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("window bounds must be timezone-aware")
        if self.start >= self.end:
            raise ValueError(f"window start {self.start} is not before its end {self.end}")

    def to_dict(self) -> dict[str, str]:
        return {"start": self.start.isoformat(), "end": self.end.isoformat()}

    @classmethod
    def from_dict(cls, values: dict[str, str]) -> Window:
        return cls(datetime.fromisoformat(values["start"]), datetime.fromisoformat(values["end"]))


@dataclass
class ValidationReport:
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def rows_dropped(self) -> int:
        return self.rows_read - self.rows_kept

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
            return f"all {self.rows_read} rows valid"
        parts = []
        for reason, count in sorted(self.dropped.items(), key=lambda item: -item[1]):
            example = self.examples[reason][0]
            parts.append(f"{count} x {reason} (e.g. {_describe(example)})")
        return f"dropped {self.rows_dropped} of {self.rows_read} rows: " + "; ".join(parts)

    def to_dict(self) -> dict:
        return {
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_dropped": self.rows_dropped,
            "dropped": self.dropped,
            "examples": self.examples,
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


def _validation_rules(params: PipelineParams, known_event_types: pa.Array) -> list[tuple[str, callable]]:
    """(reason, predicate) pairs; a row is dropped for the first predicate it matches."""
    return [
        ("null user_id", lambda t: pc.is_null(t["user_id"])),
        ("empty user_id", lambda t: _blank(t["user_id"])),
        ("null product_id", lambda t: pc.is_null(t["product_id"])),
        ("empty product_id", lambda t: _blank(t["product_id"])),
        (
            # is_in is false (not null) for a null event_type, so that row counts as unknown
            f"unknown event_type (known: {', '.join(known_event_types.to_pylist())})",
            lambda t: pc.invert(pc.is_in(t["event_type"], value_set=known_event_types)),
        ),
        ("NaN value", lambda t: pc.is_nan(t["value"])),
        ("negative value", lambda t: pc.less(t["value"], 0)),
        (f"absurd value (> max_value={params.max_value:g})", lambda t: pc.greater(t["value"], params.max_value)),
    ]


def _null_as_false(mask: pa.ChunkedArray) -> pa.ChunkedArray:
    """``fill_null(mask, False)``, in a fraction of its time on booleans (null AND false is false)."""
    return pc.and_kleene(mask, pc.is_valid(mask))


def _validate(table: pa.Table, rules, report: ValidationReport) -> pa.Table:
    """The rows no rule matches; the others are counted (and kept as examples) under the first
    rule they match. Each rule's mask is computed once; a block without bad rows, the common
    case, costs those masks and one ``any``."""
    report.rows_read += table.num_rows
    matches = [_null_as_false(predicate(table)) for _, predicate in rules]
    invalid = reduce(pc.or_, matches)
    if not pc.any(invalid).as_py():
        report.rows_kept += table.num_rows
        return table
    counted = pa.array(np.zeros(table.num_rows, dtype=bool))
    for (reason, _), match in zip(rules, matches, strict=True):
        first_match = pc.and_not(match, counted)
        if pc.any(first_match).as_py():
            report.add(reason, table.filter(first_match))
            counted = pc.or_(counted, first_match)
    kept = table.filter(pc.invert(invalid))
    report.rows_kept += kept.num_rows
    return kept


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
    at the end either way; a failure goes into ``failures`` for the reading thread to raise."""
    try:
        with (
            open(sink_fd, "wb", buffering=PIPE_BUFFER_BYTES) as sink,
            db.connect(settings) as conn,
            conn.cursor() as cur,
            cur.copy(statement, params) as copy,
        ):
            sink.writelines(copy)
    except BaseException as error:  # noqa: BLE001 - handed over to the reader, who raises it
        failures.append(error)


@contextmanager
def _copy_stream(settings: Settings, statement: str, params: dict) -> Iterator[io.BufferedReader]:
    """The output of ``COPY ... TO STDOUT`` as a readable stream while it arrives.

    A thread drains the COPY into a pipe (psycopg releases the GIL while it waits on the socket)
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
        except BaseException:
            # Closing our end makes a drainer blocked on a full pipe fail with BrokenPipeError
            # instead of waiting forever for a reader that is gone.
            source.close()
            drainer.join()
            if failures and not isinstance(failures[0], BrokenPipeError):
                raise failures[0]  # the COPY failed on its own, not because we stopped reading
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


@dataclass(frozen=True)
class ExtractResult:
    extract_dir: Path
    interactions: Path
    products: Path
    report: Path
    rows_read: int
    rows_kept: int


def extract(
    settings: Settings,
    window: Window,
    extract_dir: Path,
    params: PipelineParams,
    progress: bool = False,
) -> ExtractResult:
    """Read interactions in ``window`` and the product catalogue; write validated Parquet."""
    extract_dir.mkdir(parents=True, exist_ok=True)
    interactions_path = extract_dir / "interactions.parquet"
    tmp_path = interactions_path.with_suffix(".parquet.part")
    window_text = f"[{window.start.isoformat()}, {window.end.isoformat()})"
    query_params = {"start": window.start, "end": window.end}
    rules = _validation_rules(params, pa.array(sorted(params.event_weights), pa.string()))
    report = ValidationReport()
    try:
        with (
            _copy_stream(settings, db.sql_text(settings, "extract_interactions"), query_params) as source,
            pq.ParquetWriter(tmp_path, INTERACTIONS_SCHEMA, use_dictionary=PARQUET_DICTIONARY_COLUMNS) as writer,
            tqdm(desc="extract interactions", unit="row", unit_scale=True, disable=not progress) as bar,
        ):
            for batch in _csv_batches(source, INTERACTION_CSV_COLUMNS):
                kept = _validate(pa.Table.from_batches([batch]), rules, report)
                if kept.num_rows:
                    writer.write_table(_to_output(kept))
                bar.update(batch.num_rows)
        _check_enough_valid(report, params, f"{settings.db_schema}.interactions", window_text)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    tmp_path.replace(interactions_path)

    products_path = _extract_products(settings, extract_dir)
    report_path = extract_dir / "report.json"
    report_path.write_text(
        json.dumps({"window": window.to_dict(), "interactions": report.to_dict()}, indent=2)
    )
    log.info("extract %s: kept %d of %d rows", window_text, report.rows_kept, report.rows_read)
    return ExtractResult(
        extract_dir=extract_dir,
        interactions=interactions_path,
        products=products_path,
        report=report_path,
        rows_read=report.rows_read,
        rows_kept=report.rows_kept,
    )


def _check_enough_valid(report: ValidationReport, params: PipelineParams, table_name: str, window_text: str) -> None:
    """Log what validation dropped; raise when nothing, or too little, is left to train on."""
    if report.rows_read == 0:
        raise EmptyWindowError(f"no interactions in {table_name} with occurred_at in {window_text}")
    if report.dropped:
        log.warning("extract %s: %s", window_text, report.summary())
    if report.rows_kept == 0:
        raise NoValidDataError(f"no valid interactions in {window_text}: {report.summary()}")
    invalid_fraction = report.rows_dropped / report.rows_read
    if invalid_fraction > params.max_invalid_fraction:
        raise NoValidDataError(
            f"{invalid_fraction:.1%} of interactions in {window_text} are invalid, more than "
            f"max_invalid_fraction={params.max_invalid_fraction:.1%}: {report.summary()}"
        )


def _extract_products(settings: Settings, extract_dir: Path) -> Path:
    """Snapshot the catalogue: publish needs each product's active flag and category."""
    products_path = extract_dir / "products.parquet"
    with _copy_stream(settings, db.sql_text(settings, "extract_products"), {}) as source:
        batches = list(_csv_batches(source, PRODUCT_CSV_COLUMNS))
    pq.write_table(pa.Table.from_batches(batches, schema=pa.schema(PRODUCT_CSV_COLUMNS.items())), products_path)
    return products_path
