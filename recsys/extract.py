"""Extract stage: one time window of interactions from Postgres into Parquet, validated.

The bulk path is ``COPY (query) TO STDOUT`` streamed to a local file and parsed by Arrow in
blocks, so memory stays bounded by the block size, not by the window. Bad rows are counted,
dropped and reported with examples; the stage fails when nothing (or too little) is left.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
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
CSV_BLOCK_BYTES = 64 << 20

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


def _validation_rules(params: PipelineParams, known_event_types: pa.Array) -> list[tuple[str, callable]]:
    """(reason, predicate) pairs; a row is dropped for the first predicate it matches."""
    value = lambda t: t["value"]  # noqa: E731
    return [
        ("null user_id", lambda t: pc.is_null(t["user_id"])),
        ("empty user_id", lambda t: pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(t["user_id"])), 0)),
        ("null product_id", lambda t: pc.is_null(t["product_id"])),
        ("empty product_id", lambda t: pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(t["product_id"])), 0)),
        (
            f"unknown event_type (known: {', '.join(known_event_types.to_pylist())})",
            lambda t: pc.invert(pc.fill_null(pc.is_in(t["event_type"], value_set=known_event_types), False)),
        ),
        ("NaN value", lambda t: pc.is_nan(value(t))),
        ("negative value", lambda t: pc.less(value(t), 0)),
        (f"absurd value (> max_value={params.max_value:g})", lambda t: pc.greater(value(t), params.max_value)),
    ]


def _validate(table: pa.Table, rules, report: ValidationReport) -> pa.Table:
    report.rows_read += table.num_rows
    for reason, predicate in rules:
        bad = pc.fill_null(predicate(table), False)
        report.add(reason, table.filter(bad))
        table = table.filter(pc.invert(bad))
    report.rows_kept += table.num_rows
    return table


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


def _copy_to_file(settings: Settings, statement: str, params: dict, path: Path, progress: str | None) -> int:
    """Stream a COPY ... TO STDOUT into ``path``; returns bytes written."""
    written = 0
    with db.connect(settings) as conn, conn.cursor() as cur, path.open("wb") as out:
        with cur.copy(statement, params) as copy, tqdm(
            desc=progress, unit="B", unit_scale=True, disable=progress is None
        ) as bar:
            for chunk in copy:
                out.write(chunk)
                written += len(chunk)
                bar.update(len(chunk))
    return written


def _csv_reader(path: Path, columns: dict[str, pa.DataType]) -> pacsv.CSVStreamingReader:
    return pacsv.open_csv(
        path,
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
    raw_csv = extract_dir / "interactions.csv.part"
    query_params = {"start": window.start, "end": window.end}
    table_name = f"{settings.db_schema}.interactions"
    try:
        _copy_to_file(
            settings,
            db.sql_text(settings, "extract_interactions"),
            query_params,
            raw_csv,
            "extract interactions" if progress else None,
        )
        known = pa.array(sorted(params.event_weights), pa.string())
        rules = _validation_rules(params, known)
        report = ValidationReport()
        interactions_path = extract_dir / "interactions.parquet"
        tmp_path = interactions_path.with_suffix(".parquet.part")
        with pq.ParquetWriter(tmp_path, INTERACTIONS_SCHEMA) as writer:
            if raw_csv.stat().st_size:
                for batch in _csv_reader(raw_csv, INTERACTION_CSV_COLUMNS):
                    kept = _validate(pa.Table.from_batches([batch]), rules, report)
                    if kept.num_rows:
                        writer.write_table(_to_output(kept))
    finally:
        raw_csv.unlink(missing_ok=True)

    window_text = f"[{window.start.isoformat()}, {window.end.isoformat()})"
    if report.rows_read == 0:
        tmp_path.unlink(missing_ok=True)
        raise EmptyWindowError(f"no interactions in {table_name} with occurred_at in {window_text}")
    if report.dropped:
        log.warning("extract %s: %s", window_text, report.summary())
    if report.rows_kept == 0:
        tmp_path.unlink(missing_ok=True)
        raise NoValidDataError(f"no valid interactions in {window_text}: {report.summary()}")
    invalid_fraction = report.rows_dropped / report.rows_read
    if invalid_fraction > params.max_invalid_fraction:
        tmp_path.unlink(missing_ok=True)
        raise NoValidDataError(
            f"{invalid_fraction:.1%} of interactions in {window_text} are invalid, more than "
            f"max_invalid_fraction={params.max_invalid_fraction:.1%}: {report.summary()}"
        )
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


def _extract_products(settings: Settings, extract_dir: Path) -> Path:
    """Snapshot the catalogue: publish needs each product's active flag and category."""
    raw_csv = extract_dir / "products.csv.part"
    products_path = extract_dir / "products.parquet"
    try:
        _copy_to_file(settings, db.sql_text(settings, "extract_products"), {}, raw_csv, None)
        if raw_csv.stat().st_size:
            products = pa.concat_tables(
                pa.Table.from_batches([batch]) for batch in _csv_reader(raw_csv, PRODUCT_CSV_COLUMNS)
            )
        else:
            products = pa.table({name: pa.array([], type_) for name, type_ in PRODUCT_CSV_COLUMNS.items()})
    finally:
        raw_csv.unlink(missing_ok=True)
    pq.write_table(products, products_path)
    return products_path
