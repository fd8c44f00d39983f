"""Blocking PostgreSQL reads of the look-up page: product names and the pipeline's run history.

Both only decorate what Redis says, so callers treat any failure as "not available" and the page
shows ids only, or no chart. A short connect timeout keeps an unreachable database from holding
the page.
"""

from __future__ import annotations

from collections.abc import Iterable

from recsys.core import db
from recsys.core.settings import Settings

CONNECT_TIMEOUT_SECONDS = 3


def product_labels(settings: Settings, product_ids: Iterable[str]) -> dict[str, dict]:
    """``{product_id: {"name", "category"}}`` for the ids found in ``products`` (ids as text)."""
    wanted = sorted({str(product_id) for product_id in product_ids})
    if not wanted:
        return {}
    with db.connect(settings, connect_timeout=CONNECT_TIMEOUT_SECONDS) as conn:
        rows = conn.execute(db.sql_text(settings, "product_labels"), {"product_ids": wanted}).fetchall()
    return {product_id: {"name": name, "category": category} for product_id, name, category in rows}


def recent_runs(settings: Settings, limit: int) -> list[dict] | None:
    """The latest ``limit`` rows of ``recsys_runs``, newest first; None if the table does not exist.

    Rows come as JSON objects (``to_jsonb``), so columns the pipeline adds later (a report link)
    arrive too and a missing one is simply absent."""
    with db.connect(settings, connect_timeout=CONNECT_TIMEOUT_SECONDS) as conn:
        [exists] = conn.execute(db.sql_text(settings, "runs_table_exists")).fetchone()
        if not exists:
            return None
        return [row for (row,) in conn.execute(db.sql_text(settings, "recent_runs_json"), {"limit": limit}).fetchall()]
