"""Locks in the {p} slot: who may publish a version, and who may switch.

- ``VersionOwner`` (``{p}:owner:<version>``): one publish attempt per version. A step of the
  attempt takes it (waiting while another attempt holds it) and a thread renews it while the step
  works; between the DAG's publish tasks it lapses, and the next step of the same attempt takes it
  again. Another attempt may take it over once it lapsed: the old attempt's writes carry its own
  build name, and its switch is refused (the switch script checks the owner).
- ``SwitchLock`` (``{p}:lock:switch``): held for the short sections that change which keys are
  live or have a TTL (persisting a build and flipping the pointer, settling demotions, rollback,
  the sweep of orphans). The flip and rollback scripts check its token, and it is never renewed
  once lapsed, so a holder that stalled past its TTL cannot switch anything.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from recsys.core.errors import PublishConflictError
from recsys.storage import scripts
from recsys.storage.connection import UNAVAILABLE
from recsys.storage.keys import KeyLayout

log = logging.getLogger(__name__)


class VersionOwner:
    """The lock ``{p}:owner:<version>`` held for one publish attempt (``with``: taken, renewed by
    a daemon thread every third of its TTL; left to lapse at the end, see the module docstring)."""

    def __init__(
        self, client: Any, keys: KeyLayout, version: str, attempt: str, ttl_seconds: float, wait_seconds: float
    ) -> None:
        self.client, self.key, self.version, self.attempt = client, keys.owner(version), version, attempt
        self.ttl_ms = max(int(ttl_seconds * 1000), 100)
        self.wait_seconds = wait_seconds
        self._stop = threading.Event()
        self._lost: str | None = None
        self._renewer: threading.Thread | None = None

    def _try_claim(self) -> tuple[bool, str | None, int]:
        answer = scripts.run(self.client, "claim", [self.key], [self.attempt, self.ttl_ms])
        if answer[0] == 1:
            return True, None, 0
        return False, answer[1], int(answer[2])

    def claim(self) -> None:
        deadline, announced = time.monotonic() + self.wait_seconds, False
        while True:
            held, holder, remaining_ms = self._try_claim()
            if held:
                return
            if time.monotonic() >= deadline:
                raise PublishConflictError(
                    f"version {self.version} is being published by another attempt ({holder}; its lock "
                    f"expires in {remaining_ms / 1000:.0f} s unless renewed); gave up after waiting "
                    f"{self.wait_seconds:.0f} s. Try again when that publish has finished."
                )
            if not announced:
                log.warning("version %s is being published by attempt %s; waiting for it", self.version, holder)
                announced = True
            time.sleep(min(0.25, max(self.ttl_ms / 4000, 0.05)))

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                held, holder, _ = self._try_claim()
            except UNAVAILABLE:
                continue  # Redis away: the writer notices on its own; the switch re-checks the owner
            if not held:
                self._lost = holder
                return

    def check(self) -> None:
        """Raise if another attempt has taken the version over (this one lapsed)."""
        if self._lost is not None:
            raise PublishConflictError(
                f"version {self.version}: attempt {self.attempt} lost its lock to attempt {self._lost}; stopping"
            )

    def release(self) -> None:
        scripts.run(self.client, "release", [self.key], [self.attempt])

    def __enter__(self) -> VersionOwner:
        self.claim()
        self._renewer = threading.Thread(target=self._renew, name=f"owner-{self.version}", daemon=True)
        self._renewer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()


class SwitchLock:
    """``{p}:lock:switch`` for one short section (``with``): taken with a token of its own, waiting
    up to ``wait_seconds`` for another holder, released at the end (or lapsing after its TTL)."""

    def __init__(self, client: Any, keys: KeyLayout, ttl_seconds: float, wait_seconds: float) -> None:
        self.client, self.key = client, keys.switch_lock()
        self.token = uuid.uuid4().hex
        self.ttl_ms = max(int(ttl_seconds * 1000), 100)
        self.wait_seconds = wait_seconds

    def __enter__(self) -> SwitchLock:
        deadline = time.monotonic() + self.wait_seconds
        # (a SET retried after its reply was lost finds the token it set)
        while not self.client.set(self.key, self.token, nx=True, px=self.ttl_ms) and self.client.get(self.key) != self.token:
            if time.monotonic() >= deadline:
                raise PublishConflictError(
                    f"another publish or rollback has been switching versions for over {self.wait_seconds:.0f} s "
                    f"(Redis key {self.key}); try again when it has finished"
                )
            time.sleep(0.05)
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            scripts.run(self.client, "release", [self.key], [self.token])
        except UNAVAILABLE:
            pass  # it lapses after its TTL


@contextmanager
def tune_lock(client: Any, keys: KeyLayout, ttl_seconds: float, wait_seconds: float) -> Iterator[bool]:
    """``{p}:lock:tune`` (redis-py's lock): yields whether it was taken within ``wait_seconds``."""
    lock = client.lock(keys.tune_lock(), timeout=ttl_seconds, blocking_timeout=wait_seconds)
    taken = lock.acquire()
    try:
        yield taken
    finally:
        if taken:
            lock.release()
