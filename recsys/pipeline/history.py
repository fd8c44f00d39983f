"""Quality history: one ``recsys_runs`` row per evaluated run, in the shop's PostgreSQL.

The evaluate stage inserts the row (status ``evaluated`` or ``refused``); publish sets
``published``, ``skipped_stale`` or ``failed`` on the row its own DAG run recorded last. Operators read it with
``recsys history``, the evaluation report plots its last runs, the look-up page shows it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from recsys.core import db
from recsys.core.errors import InputError
from recsys.core.settings import Settings

EVALUATED, REFUSED, PUBLISHED, SKIPPED_STALE, FAILED = "evaluated", "refused", "published", "skipped_stale", "failed"


@dataclass(frozen=True)
class RunRecord:
    """What the evaluate stage knows about a run when it records it."""

    run_key: str
    dag_run_id: str | None
    window_start: datetime
    window_end: datetime
    params: dict
    metrics: dict  # {"model": {...}, "popularity": {...}}
    gate_passed: bool
    gate_reason: str
    extract_counts: dict | None
    train_seconds: float | None
    interactions: int | None
    users: int | None
    items: int | None

    @property
    def status(self) -> str:
        return EVALUATED if self.gate_passed else REFUSED


@contextmanager
def _history_table(settings: Settings) -> Iterator[psycopg.Connection]:
    """A connection for the history; a database from before the table says how to add it."""
    try:
        with db.connect(settings) as conn:
            yield conn
    except psycopg.errors.UndefinedTable as missing:
        raise InputError(
            f"schema {settings.db_schema} has no recsys_runs table (the quality history, added in this version): "
            "run `recsys init-db` once (it only adds what is missing; on a large interactions table see "
            "docs/security.md for building its event_id index concurrently first)"
        ) from missing


def record_evaluation(settings: Settings, record: RunRecord) -> datetime:
    """Insert the run's row; returns its recorded_at."""
    values: dict[str, Any] = {**record.__dict__, "status": record.status}
    for name in ("params", "metrics", "extract_counts"):
        if values[name] is not None:
            values[name] = Jsonb(values[name])
    with _history_table(settings) as conn:
        return conn.execute(db.sql_text(settings, "insert_run"), values).fetchone()[0]


def record_publish(
    settings: Settings, run_key: str, status: str, version: str | None = None, dag_run_id: str | None = None
) -> bool:
    """Set the publish outcome on the row DAG run ``dag_run_id`` (None: a run outside Airflow)
    recorded last for ``run_key``; False when it has no row (it was evaluated before the history
    existed)."""
    with _history_table(settings) as conn:
        updated = conn.execute(
            db.sql_text(settings, "update_run_status"),
            {"run_key": run_key, "status": status, "published_version": version, "dag_run_id": dag_run_id},
        ).rowcount
    return updated > 0


@dataclass(frozen=True)
class Publisher:
    dag_run_id: str | None  # None: published outside Airflow (recsys run, recsys publish)


def publisher_of(settings: Settings, version: str) -> Publisher | None:
    """Which run published ``version`` last, if the history recorded it."""
    with _history_table(settings) as conn:
        row = conn.execute(db.sql_text(settings, "publisher_of_version"), {"version": version}).fetchone()
    return None if row is None else Publisher(row[0])


def recent_runs(settings: Settings, limit: int = 20) -> list[dict]:
    """The last ``limit`` rows, newest first, as dicts (JSON columns decoded)."""
    with _history_table(settings) as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(db.sql_text(settings, "recent_runs"), {"limit": limit}).fetchall()


def as_json(row: dict) -> str:
    """One history row as a JSON line (timestamps in ISO 8601)."""
    return json.dumps({key: value.isoformat() if isinstance(value, datetime) else value for key, value in row.items()})
