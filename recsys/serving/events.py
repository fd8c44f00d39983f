"""The shop database side of the API (blocking: it runs in the thread pool): reading a user's
events, storing an event once (idempotently), and the refreshes left pending while Redis was down.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from enum import Enum

from recsys.core import db
from recsys.core.settings import Settings
from recsys.serving.schemas import EventIn

log = logging.getLogger(__name__)

FOLD_IN_MAX_EVENTS = 5_000  # a user's most recent events a fold-in reads



def fetch_user_events(
    settings: Settings, user_id: str, since: datetime, negative_types: tuple[str, ...]
) -> list[tuple[str, str, float | None, float]]:
    """The user's events since ``since``, and those of ``negative_types`` of any age."""
    with db.connect(settings) as conn:
        rows = conn.execute(
            db.sql_text(settings, "user_interactions"),
            {"user_id": user_id, "start": since, "negative_types": list(negative_types), "limit": FOLD_IN_MAX_EVENTS},
        ).fetchall()
    return [tuple(row) for row in rows]


class Stored(Enum):
    """What ``record_event`` did with an event."""

    NEW = "new"
    REPLAYED = "replayed"  # its event_id was stored before, for the same event: nothing written
    ID_REUSED = "id_reused"  # its event_id names another stored event: nothing written
    UNKNOWN_PRODUCT = "unknown_product"  # not in the catalogue: nothing written


def record_event(settings: Settings, user_id: str, event: EventIn, occurred_at: datetime, event_id: str | None) -> Stored:
    """Insert the event, once per ``event_id``; committed before this returns."""
    product_id = str(event.product_id)
    with db.connect(settings) as conn:
        if conn.execute(db.sql_text(settings, "product_exists"), {"product_id": product_id}).fetchone() is None:
            return Stored.UNKNOWN_PRODUCT
        inserted = conn.execute(
            db.sql_text(settings, "insert_event"),
            {
                "user_id": user_id,
                "product_id": product_id,
                "event_type": event.event_type,
                "value": event.value,
                "occurred_at": occurred_at,
                "event_id": event_id,
                "recommendation_id": event.recommendation_id,
            },
        ).fetchone()
        if inserted is not None:
            return Stored.NEW
        stored = conn.execute(db.sql_text(settings, "event_by_id"), {"event_id": event_id}).fetchone()
    same = tuple(stored[:3]) == (user_id, product_id, event.event_type) and _counted(stored[3]) == _counted(event.value)
    return Stored.REPLAYED if same else Stored.ID_REUSED


def _counted(value: float | None) -> float:
    """A value as the pipeline counts it: null is 1, so a retry sending 1 for a stored null is the same event."""
    return 1.0 if value is None else float(value)


def mark_refresh_pending(settings: Settings, user_id: str) -> None:
    with db.connect(settings) as conn:
        conn.execute(
            db.sql_text(settings, "mark_refresh_pending"), {"user_id": user_id, "requested_at": datetime.now(UTC)}
        )


def fetch_pending_refreshes(settings: Settings, limit: int) -> list[tuple[str, datetime]]:
    with db.connect(settings) as conn:
        return [tuple(row) for row in conn.execute(db.sql_text(settings, "pending_refreshes"), {"limit": limit})]


def clear_pending_refresh(settings: Settings, user_id: str, requested_at: datetime) -> None:
    with db.connect(settings) as conn:
        conn.execute(db.sql_text(settings, "clear_pending_refresh"), {"user_id": user_id, "requested_at": requested_at})
