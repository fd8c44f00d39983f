"""A run's data window, and the names derived from it: the version published to Redis and the
run's folder both start with the window end, written one way (``stamp``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from recsys.core.params import PipelineParams

TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"


def stamp(moment: datetime) -> str:
    """``20261128T030000Z``: a moment in UTC as it appears in version and folder names."""
    return f"{moment.astimezone(UTC):{TIMESTAMP_FORMAT}}"


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


def window_ending(end: datetime, params: PipelineParams) -> Window:
    # a plain datetime in UTC: Airflow hands over pendulum objects, whose arithmetic can drop tzinfo
    end = datetime.fromtimestamp(end.timestamp(), tz=UTC)
    return Window(start=end - timedelta(days=params.lookback_days), end=end)


def version_name(window: Window, params: PipelineParams) -> str:
    """Same data window and params -> same version: reruns overwrite instead of duplicating."""
    return f"{stamp(window.end)}-{params.fingerprint()}"
