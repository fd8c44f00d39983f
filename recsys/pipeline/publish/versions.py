"""The live version in Redis: who may publish it, the checked switch, kept versions, rollback, and
the invariants every state must satisfy (docs/reliability.md).

- **One owner per version.** A publish attempt holds ``{p}:owner:<version>`` (SET NX with a TTL,
  renewed while it works). Another attempt of the same version waits until the lock is released or
  lapses (its owner died), then goes on; it never writes into the owner's keys, which carry the
  owner's attempt id.
- **The switch checks everything it switches** (``lua/switch.lua``, one atomic script): the caller
  still owns the version, the version's data does not end in the future, every staged structure
  holds the count the staged meta records, and no fresher version is live. Otherwise it refuses
  and the live version stays. The replaced version is kept (at most ``keep_versions``, with a TTL).
- **Rollback** (``lua/rollback.lua``) makes a kept version live again, as atomically.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib import resources

import redis

from recsys.core.errors import (
    IncompleteVersionError,
    PublishConflictError,
    RecsysError,
    StaleVersionError,
)
from recsys.core.redis_keys import (
    COUNTED_STRUCTURES,
    FOLD_IN_USERS,
    LATER_COUNTED_STRUCTURES,
    STRUCTURES,
    KeyLayout,
    decode_meta,
)

log = logging.getLogger(__name__)

LIVE_TTL = -1  # what TTL answers for a key without expiry


@cache
def _script_text(name: str) -> str:
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text()


# what both scripts check, in their ARGV: the structures (meta last), their count fields, the later ones
_LAYOUT_ARGS = [
    json.dumps(list(STRUCTURES)), json.dumps(COUNTED_STRUCTURES), json.dumps(sorted(LATER_COUNTED_STRUCTURES)),
]


def run_script(client: redis.Redis, name: str, keys: list[str], args: list) -> object:
    """EVALSHA the packaged script ``name`` (redis-py loads it once per server, again after a restart)."""
    return client.register_script(_script_text(name))(keys=keys, args=args)


# --- owner lock -------------------------------------------------------------------------------------


class VersionOwner:
    """The lock ``{p}:owner:<version>`` held for one publish attempt.

    ``claim`` takes it (waiting while another attempt holds it), and a daemon thread renews it
    every third of its TTL while the ``with`` block runs. A task that ends without releasing it
    (a DAG task between publish steps, or a killed process) lets it lapse after the TTL: a later
    step of the same attempt takes it again; another attempt may take it over.
    """

    def __init__(
        self, client: redis.Redis, keys: KeyLayout, version: str, attempt: str, ttl_seconds: float, wait_seconds: float
    ) -> None:
        self.client, self.key, self.version, self.attempt = client, keys.owner(version), version, attempt
        self.ttl_ms = max(int(ttl_seconds * 1000), 100)
        self.wait_seconds = wait_seconds
        self._stop = threading.Event()
        self._lost: str | None = None
        self._renewer: threading.Thread | None = None

    def _try_claim(self) -> tuple[bool, str | None, int]:
        answer = run_script(self.client, "claim", [self.key], [self.attempt, self.ttl_ms])
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
            except redis.RedisError:
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
        run_script(self.client, "release", [self.key], [self.attempt])

    def __enter__(self) -> VersionOwner:
        self.claim()
        self._renewer = threading.Thread(target=self._renew, name=f"owner-{self.version}", daemon=True)
        self._renewer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()


# --- switch, kept versions, rollback ----------------------------------------------------------------


def _refusal(error: redis.ResponseError, version: str) -> RecsysError:
    """The script's refusal as the exception an operator can act on."""
    kind, *detail = str(error).split(" ")
    if kind == "STALE":
        live_version, live_end = detail
        return StaleVersionError(
            f"live version {live_version} has data up to "
            f"{datetime.fromtimestamp(float(live_end), UTC).isoformat()}, newer than version {version}'s; "
            "not replacing it"
        )
    if kind == "OWNER":
        return PublishConflictError(f"version {version}: another attempt ({detail[0]}) owns it now; not switching")
    if kind == "FUTURE":
        return IncompleteVersionError(f"version {version}'s data ends in the future; not switching")
    if kind == "INCOMPLETE":
        structure, found, expected = detail
        return IncompleteVersionError(
            f"version {version}: staged {structure} holds {found} entries, its meta records {expected}; "
            "not switching (the live version stays)"
        )
    raise error


def switch_live(
    client: redis.Redis,
    keys: KeyLayout,
    version: str,
    attempt: str,
    data_end_ts: float,
    latest_allowed_end_ts: float,
    keep_versions: int,
    kept_ttl_seconds: int,
) -> None:
    """Make the attempt's staged keys live in one atomic step, or raise and change nothing."""
    script_keys = [
        keys.owner(version),
        *(keys.live(s) for s in STRUCTURES),
        *(keys.staging(version, attempt, s) for s in STRUCTURES),
        keys.history(),
    ]
    args = [
        attempt, keys.tag, version, repr(data_end_ts), repr(latest_allowed_end_ts), keep_versions, kept_ttl_seconds,
        *_LAYOUT_ARGS,
    ]
    try:
        run_script(client, "switch", script_keys, args)
    except redis.ResponseError as error:
        if str(error).startswith("OWNER") and client.hget(keys.live("meta"), "attempt") == attempt:
            return  # a retry after a lost reply: the first call switched (and released the lock)
        raise _refusal(error, version) from error


@dataclass(frozen=True)
class VersionInfo:
    role: str  # live | kept
    version: str
    data_end: str | None
    published_at: str | None
    counts: dict
    ttl_seconds: int  # -1 for the live version
    complete: bool


def _info(client: redis.Redis, role: str, meta_key: str, structure_key) -> VersionInfo | None:
    meta = decode_meta(client.hgetall(meta_key))
    if meta is None:
        return None
    return VersionInfo(
        role=role,
        version=meta.get("version", "?"),
        data_end=meta.get("data_end"),
        published_at=meta.get("published_at"),
        counts=meta.get("counts", {}),
        ttl_seconds=client.ttl(meta_key),
        complete=not structure_problems(client, meta, structure_key),
    )


def versions(client: redis.Redis, keys: KeyLayout) -> list[VersionInfo]:
    """The live version, then the kept ones (newest first) that still exist."""
    found = []
    live = _info(client, "live", keys.live("meta"), keys.live)
    if live is not None:
        found.append(live)
    for version in client.lrange(keys.history(), 0, -1):
        kept = _info(client, "kept", keys.previous(version, "meta"), lambda s, v=version: keys.previous(v, s))
        if kept is not None:
            found.append(kept)
    return found


def rollback(client: redis.Redis, keys: KeyLayout, kept_ttl_seconds: int, version: str | None = None) -> str:
    """Make ``version`` (default: the newest kept one) live again; returns it."""
    if version is None:
        kept = [info for info in versions(client, keys) if info.role == "kept"]
        if not kept:
            raise RecsysError("no kept version to roll back to (see `recsys versions`); `recsys republish` "
                              "publishes a finished run again from its artifacts")
        version = kept[0].version
    script_keys = [*(keys.live(s) for s in STRUCTURES), keys.history()]
    try:
        run_script(client, "rollback", script_keys, [keys.tag, version, kept_ttl_seconds, *_LAYOUT_ARGS])
    except redis.ResponseError as error:
        kind, *detail = str(error).split(" ")
        if kind == "GONE":
            raise RecsysError(f"version {version} is not kept (expired, or never published); see `recsys versions`") from error
        if kind == "INCOMPLETE":
            raise IncompleteVersionError(f"kept version {version} is incomplete ({' '.join(detail)}); not rolling back") from error
        raise
    log.warning("rolled back: version %s is live again", version)
    return version


# --- invariants -------------------------------------------------------------------------------------


def structure_problems(client: redis.Redis, meta: dict, structure_key) -> list[str]:
    """How a version (its decoded meta and ``structure_key(structure)`` -> key) is incomplete."""
    problems = []
    counts = meta.get("counts") or {}
    for structure, field in COUNTED_STRUCTURES.items():
        expected = counts.get(field, 0 if structure in LATER_COUNTED_STRUCTURES else None)
        if structure == "user_recs" and expected is not None:
            expected += int(meta.get(FOLD_IN_USERS, 0))
        found = client.hlen(structure_key(structure))
        if found != expected:
            problems.append(f"{structure} holds {found} entries, meta records {expected}")
    return problems


def live_problems(client: redis.Redis, keys: KeyLayout) -> list[str]:
    """Invariant I1: either nothing is live, or every live structure is there, complete and has no
    TTL. Empty when it holds."""
    meta = decode_meta(client.hgetall(keys.live("meta")))
    if meta is None:
        stray = [s for s in STRUCTURES if client.exists(keys.live(s))]
        return [f"live {s} exists without a live meta" for s in stray]
    problems = structure_problems(client, meta, keys.live)
    problems += [f"live {s} has a TTL" for s in STRUCTURES if client.exists(keys.live(s)) and client.ttl(keys.live(s)) != LIVE_TTL]
    return problems


def keys_without_ttl(client: redis.Redis, keys: KeyLayout) -> list[str]:
    """Invariant I3: keys under the prefix that would live forever, other than the live set."""
    live = {keys.live(s) for s in STRUCTURES}
    return sorted(
        key for key in client.scan_iter(match=keys.pattern(), count=1000) if key not in live and client.ttl(key) == LIVE_TTL
    )


def live_data_end(client: redis.Redis, keys: KeyLayout) -> float | None:
    raw = client.hget(keys.live("meta"), "data_end_ts")
    return None if raw is None else float(raw)
