"""What makes an interaction's value invalid: one wording for the extract, which drops and counts
such rows column by column, and for the events API, which refuses such an event before storing
it (a write key must not be able to push a daily run towards ``max_invalid_fraction``)."""

from __future__ import annotations

import math

PURCHASE = "purchase"
NAN_VALUE = "NaN value"
NEGATIVE_VALUE = "negative value"
NON_POSITIVE_PURCHASE = f"{PURCHASE} quantity <= 0"


def absurd_value(max_value: float) -> str:
    return f"absurd value (> max_value={max_value:g})"


def value_problem(event_type: str, value: float | None, max_value: float) -> str | None:
    """The extract's reason for dropping a row with this event type and value, or None. A null
    value counts as 1 and is always valid."""
    if value is None:
        return None
    if math.isnan(value):
        return NAN_VALUE
    if value < 0:
        return NEGATIVE_VALUE
    if event_type == PURCHASE and value <= 0:
        return NON_POSITIVE_PURCHASE
    if value > max_value:
        return absurd_value(max_value)
    return None
