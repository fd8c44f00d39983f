"""What an API process served to the users of an experiment, written to the shop's
``recommendation_exposures`` (the analysis counts these rows, docs/experiments.md) without a
request ever waiting for the database.

A request only appends a tuple to an in-process buffer; a background task writes the buffer with
one COPY every RECSYS_API_EXPOSURE_FLUSH_SECONDS, in a thread, and once more when the process shuts
down cleanly (the lifespan waits for that last flush). While the database cannot take them, rows wait in the buffer (a failed COPY writes
nothing, so they are sent again whole) up to RECSYS_API_EXPOSURE_BUFFER_ROWS; beyond, new rows are
dropped, counted (``dropped``) and logged, never blocking nor failing a request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from contextlib import suppress
from datetime import UTC, datetime

import psycopg

from recsys.core import db
from recsys.core.settings import Settings

log = logging.getLogger(__name__)

# seconds a flush waits for the database to accept a connection: the next flush tries again
CONNECT_TIMEOUT = 5
# (recommendation_id, experiment, variant, user_id, served_at as epoch seconds, product ids served)
Exposure = tuple[str, str, str, str, float, Sequence]


class ExposureLog:
    """The bounded buffer of one API process and its flushes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.max_rows = settings.api_exposure_buffer_rows
        self.dropped = 0  # rows never written: the buffer was full, or the database refused them
        self.written = 0
        self._rows: list[Exposure] = []
        self._in_flight = 0  # rows a running flush holds: they come back if it fails
        self._dropped_reported = 0
        self._stopping = asyncio.Event()
        self._waiting = False  # the last flush found the database unreachable

    def record(self, exposure: Exposure) -> None:
        """Called on the request's path: an append, or a count when the buffer is full."""
        if len(self._rows) + self._in_flight >= self.max_rows:
            self.dropped += 1
            return
        self._rows.append(exposure)

    async def flush(self) -> None:
        """Write what the buffer holds (in a thread: the event loop never waits on the database)."""
        rows, self._rows = self._rows, []
        if rows:
            self._in_flight = len(rows)
            try:
                await asyncio.to_thread(self._copy, rows)
                self.written += len(rows)
                if self._waiting:
                    log.warning("exposures written again to the shop database")
                    self._waiting = False
            except psycopg.OperationalError as error:
                # the database is away: the rows wait for the next flush (the COPY wrote none of them)
                self._rows = rows + self._rows
                if not self._waiting:  # once per outage, not every flush
                    log.warning("exposures wait for the shop database (%d now): %s", len(self._rows), type(error).__name__)
                    self._waiting = True
            except Exception:  # noqa: BLE001 - e.g. no table, a duplicate id: sending them again cannot help
                self.dropped += len(rows)
                log.exception("%d exposures dropped, not written", len(rows))
            finally:
                self._in_flight = 0
        if self.dropped > self._dropped_reported:
            log.warning(
                "%d exposures dropped in all (%d since the last report): the buffer of %d rows was full or the "
                "shop database refused them", self.dropped, self.dropped - self._dropped_reported, self.max_rows,
            )
            self._dropped_reported = self.dropped

    def _copy(self, rows: list[Exposure]) -> None:
        # the rows as COPY's text format, built here: psycopg adapting each value (a datetime, a
        # list) cost 2.5x as much CPU per row (9.4 against 3.7 µs, 15,000 rows), and it is the API process's CPU
        text = "".join(
            f"{recommendation_id}\t{experiment}\t{variant}\t{_field(user_id)}\t"
            f"{datetime.fromtimestamp(served_at, UTC).isoformat()}\t{_array(products)}\n"
            for recommendation_id, experiment, variant, user_id, served_at, products in rows
        )
        with db.connect(self.settings, connect_timeout=CONNECT_TIMEOUT) as conn, conn.cursor() as cursor:
            with cursor.copy(db.sql_text(self.settings, "load_exposures")) as copy:
                copy.write(text)

    async def flush_periodically(self) -> None:
        """Background task of each API process: a flush every interval, and a last one once
        :meth:`stop` is called (not a cancellation, which could cut a flush's COPY short)."""
        while not self._stopping.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.api_exposure_flush_seconds)
            await self.flush()
        if self._rows:  # the database was still away at the last flush
            self.dropped += len(self._rows)
            log.warning("%d exposures dropped at shutdown: the shop database was unreachable", len(self._rows))
            self._rows = []

    def stop(self) -> None:
        self._stopping.set()


def _field(value: str) -> str:
    """A value in COPY's text format (experiment and variant names and the hex recommendation_id
    need no escaping)."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _array(products: Sequence) -> str:
    """A TEXT[] literal of the product ids (integers, or strings quoted), as a COPY text field."""
    elements = (str(p) if isinstance(p, int) else '"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in products)
    return _field("{" + ",".join(elements) + "}")
