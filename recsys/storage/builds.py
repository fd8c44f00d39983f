"""A publish attempt's build in Redis: staged with a TTL, checked bucket by bucket, made live by one
flip of the live pointer, kept for rollback, and swept when orphaned (docs/scaling.md).

How a build goes live (``switch``), under the switch lock:

1. every bucket of every structure is checked against the counts the attempt recorded in the
   bucket's ``info`` (one script per bucket, each on its own slot);
2. the build's bucket keys lose their TTL;
3. ``switch.lua``, on the {p} slot alone, checks the owner, the data end and the top buys, moves
   the pointer to the build, and records the replaced build's new TTL as a pending demotion;
4. the demotions are settled: the replaced build's bucket keys get their TTL back.

A reader resolves the pointer and then reads the build's keys, which never change once written
(apart from the API's fold-ins, which the info counts), so a reader racing a switch still reads
one whole build: the replaced one stays readable for the rollback window, or at least
``READER_GRACE_SECONDS``. Dying between 2 and 3 leaves a build without TTL that is not live, and
between 3 and 4 a kept build without TTL: both are taken care of by the next switch or sweep
(``settle``, ``sweep``), never a live key with a TTL.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from redis.exceptions import ResponseError

from recsys.core.errors import IncompleteVersionError, PublishConflictError, RecsysError, StaleVersionError
from recsys.storage import scripts
from recsys.storage.connection import ScriptError, is_cluster
from recsys.storage.keys import BUCKETED, INFO, OLD_LAYOUT_LIVE, KeyLayout, buckets_of, build_name
from recsys.storage.locks import SwitchLock, VersionOwner

log = logging.getLogger(__name__)

# staging keys of a publish that died half-way expire by themselves; the switch removes the TTL
STAGING_TTL_SECONDS = 6 * 3600
# how long a build that left the live set stays readable at least (readers cache the pointer ≤ 1 s)
READER_GRACE_SECONDS = 60
# the registry of builds outlives any build that may still need sweeping
REGISTRY_TTL_SECONDS = 30 * 86400
# fields per HSET and HSETs per round trip: measured near redis-benchmark's pipelined SET rate
HSET_CHUNK = 10_000
HSETS_PER_ROUND_TRIP = 8
# how long a switch waits for the replicas of each master to hold the build
REPLICA_WAIT_SECONDS = 5.0


@dataclass(frozen=True)
class BucketState:
    """One bucket of a build as ``bucket_state.lua`` read it."""

    bucket: int
    has_info: bool
    found: dict[str, int]  # entries per structure
    recorded: dict[str, int]  # what the info records (-1: nothing)
    ttls: dict[str, int]  # per key (structures and info): -2 missing, -1 none
    fold_ins: int

    def problems(self) -> list[str]:
        if not self.has_info:
            return [f"bucket {self.bucket} has no info"]
        problems = []
        for structure in BUCKETED:
            expected = self.recorded[structure] + (self.fold_ins if structure == "user_recs" else 0)
            if self.found[structure] != expected:
                problems.append(f"{structure} of bucket {self.bucket} holds {self.found[structure]} entries, "
                                f"its info records {expected}")
        return problems


class Build:
    """One publish attempt's copy of a version: ``{p:b}:<version>.<attempt>:<structure>`` per
    bucket, and in the {p} slot its meta, top buys and manifest."""

    def __init__(self, client: Any, keys: KeyLayout, version: str, attempt: str) -> None:
        self.client, self.keys, self.version, self.attempt = client, keys, version, attempt
        self.name = build_name(version, attempt)

    def key(self, structure: str, bucket: int) -> str:
        return self.keys.data(self.name, bucket, structure)

    # --- writing ---------------------------------------------------------------------------------

    def write_entries(
        self, structure: str, ids: pa.Array, values_of: Callable[[np.ndarray], pa.Array], owner: VersionOwner,
    ) -> np.ndarray:
        """HSET each of ``ids`` -> its value (text) into the structure's bucket of the id, each call
        with the staging TTL; returns the entries written per bucket. ``values_of(rows)``: the
        values of ``ids[rows]``, asked for one round trip's entries at a time, so the values are
        built while Redis stores the round trip before, and never held all at once."""
        buckets = buckets_of(ids, self.keys.buckets)
        order = np.argsort(buckets.astype(np.uint16), kind="stable")  # a radix sort at 16 bits (buckets ≤ 4096)
        counts = np.bincount(buckets, minlength=self.keys.buckets)
        starts = np.concatenate([[0], np.cumsum(counts)])
        # (key, first position in ``order``, entries) per HSET, in bucket order
        chunks = [
            (self.key(structure, bucket), start, min(HSET_CHUNK, int(starts[bucket + 1]) - start))
            for bucket in range(self.keys.buckets)
            for start in range(int(starts[bucket]), int(starts[bucket + 1]), HSET_CHUNK)
        ]
        write = self._write_pipelined if is_cluster(self.client) else self._write_packed
        write(_round_trips(ids, values_of, order, chunks), owner)
        return counts

    def _write_pipelined(self, round_trips: Iterator[_RoundTrip], owner: VersionOwner) -> None:
        """Each round trip through a redis-py pipeline: the path of a cluster, whose round trips
        go to several nodes."""
        for trip in round_trips:
            pipe = self.client.pipeline(transaction=False)
            for key, start, length in trip.chunks:
                pairs: list = [None] * (2 * length)
                pairs[0::2] = trip.ids.slice(start, length).to_pylist()
                pairs[1::2] = trip.values.slice(start, length).to_pylist()
                # the script writes the first entry and sets the TTL (the hash never exists without
                # one); the rest follows as a plain HSET, which keeps the TTL and costs Redis about
                # half of passing every entry through Lua
                scripts.queue(pipe, "hset_ttl", [key], [STAGING_TTL_SECONDS, *pairs[:2]])
                if length > 1:
                    pipe.hset(key, items=pairs[2:])
            owner.check()
            pipe.execute()

    def _write_packed(self, round_trips: Iterator[_RoundTrip], owner: VersionOwner) -> None:
        """What ``_write_pipelined`` sends, the same commands in the same round trips, with each
        HSET's entries encoded by Arrow at once: redis-py packs a command argument by argument
        in Python, which cost more than Redis executing the HSETs (a single node's path)."""
        pool = self.client.connection_pool
        connection = pool.get_connection()
        # one round trip in flight while the next is built and sent: its replies are read after
        in_flight: tuple[bytes, int] | None = None
        try:
            for trip in round_trips:
                entries = _resp_bulk_pairs(trip.ids, trip.values)
                offsets = np.frombuffer(entries.buffers()[1], np.int64)[entries.offset : entries.offset + len(entries) + 1]
                data = entries.buffers()[2]
                parts: list = []
                for key, start, length in trip.chunks:
                    # the first entry through the script, as in _write_pipelined
                    parts += connection.pack_command(
                        "EVAL", scripts.text("hset_ttl"), 1, key, STAGING_TTL_SECONDS,
                        trip.ids[start].as_py(), trip.values[start].as_py(),
                    )
                    if length > 1:
                        encoded_key = key.encode()
                        parts.append(b"*%d\r\n$4\r\nHSET\r\n$%d\r\n%s\r\n" % (2 * length, len(encoded_key), encoded_key))
                        parts.append(data[int(offsets[start + 1]) : int(offsets[start + length])])
                sent = (b"".join(parts), len(trip.chunks) + sum(length > 1 for _, _, length in trip.chunks))
                owner.check()
                _exchange(connection, in_flight, sent)
                in_flight = sent
            _exchange(connection, in_flight, None)
        except BaseException:
            connection.disconnect()  # replies may be left unread on it
            raise
        finally:
            pool.release(connection)

    def write_top_buys(self, lists: dict[str, str]) -> int:
        flat = [part for item in lists.items() for part in item]
        scripts.run(self.client, "hset_ttl", [self.keys.top_buys(self.name)], [STAGING_TTL_SECONDS, *flat])
        return len(lists)

    def clear(self, structure: str) -> None:
        """Delete the structure in every bucket (before staging it again)."""
        pipe = self.client.pipeline(transaction=False)
        for bucket in range(self.keys.buckets):
            pipe.delete(self.key(structure, bucket))
        pipe.execute()

    def record(self, mapping: dict[str, Any]) -> None:
        """Into the attempt's manifest, with the staging TTL in the same step."""
        flat = [str(part) for item in mapping.items() for part in item]
        scripts.run(self.client, "hset_ttl", [self.keys.manifest(self.name)], [STAGING_TTL_SECONDS, *flat])

    def record_once(self, field: str, value: str) -> str:
        """``field`` of the manifest: ``value`` unless a step of the attempt recorded one first."""
        return scripts.run(self.client, "hsetnx_ttl", [self.keys.manifest(self.name)], [STAGING_TTL_SECONDS, field, value])

    def manifest(self) -> dict[str, str]:
        return self.client.hgetall(self.keys.manifest(self.name))

    def forget_manifest(self) -> None:
        self.client.delete(self.keys.manifest(self.name))

    def write_infos(self, counts: dict[str, np.ndarray]) -> None:
        """Each bucket's info: the entries each structure holds there (fold-ins start at 0)."""
        pipe = self.client.pipeline(transaction=False)
        for bucket in range(self.keys.buckets):
            flat = [part for structure in BUCKETED for part in (structure, int(counts[structure][bucket]))]
            scripts.queue(pipe, "hset_ttl", [self.key(INFO, bucket)], [STAGING_TTL_SECONDS, *flat])
        pipe.execute()

    def write_meta(self, meta: dict[str, str]) -> None:
        """The build's meta, with its bucket count and each bucket's hash tag (what a reader in
        another language needs to find an id's key: the tag of CRC32(id) modulo the buckets)."""
        layout = {"buckets": self.keys.buckets, "bucket_tags": json.dumps(list(self.keys.bucket_tags))}
        flat = [part for item in {**meta, **layout}.items() for part in item]
        scripts.run(self.client, "hset_ttl", [self.keys.meta(self.name)], [STAGING_TTL_SECONDS, *flat])

    def register(self) -> None:
        """Into the registry of builds the sweep looks after (before any key without a TTL exists)."""
        registry = self.keys.registry()
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(registry, {self.name: time.time()})
        pipe.expire(registry, REGISTRY_TTL_SECONDS)
        pipe.execute()

    # --- checking and switching ----------------------------------------------------------------

    def states(self) -> list[BucketState]:
        return bucket_states(self.client, self.keys, self.name)

    def set_ttl(self, seconds: int) -> None:
        """Every bucket key of the build: a TTL of ``seconds``, or none (-1)."""
        set_bucket_ttls(self.client, self.keys, self.name, seconds)

    def drop(self) -> None:
        """Delete every key of the build (an abandoned attempt)."""
        pipe = self.client.pipeline(transaction=False)
        for bucket in range(self.keys.buckets):
            for key in self.keys.build_keys(self.name, bucket):
                pipe.delete(key)
        for key in (self.keys.meta(self.name), self.keys.top_buys(self.name), self.keys.manifest(self.name)):
            pipe.delete(key)
        pipe.execute()


def bucket_states(client: Any, keys: KeyLayout, build: str) -> list[BucketState]:
    """Every bucket of ``build`` (``keys`` with the build's bucket count), each read atomically."""
    pipe = client.pipeline(transaction=False)
    for bucket in range(keys.buckets):
        scripts.queue(pipe, "bucket_state", keys.build_keys(build, bucket), list(BUCKETED))
    states = []
    for bucket, (has_info, found, recorded, ttls, fold_ins) in enumerate(pipe.execute()):
        names = (*BUCKETED, INFO)
        states.append(BucketState(
            bucket, bool(has_info), dict(zip(BUCKETED, found, strict=True)), dict(zip(BUCKETED, recorded, strict=True)),
            dict(zip(names, ttls, strict=True)), int(fold_ins),
        ))
    return states


def set_bucket_ttls(client: Any, keys: KeyLayout, build: str, seconds: int) -> None:
    pipe = client.pipeline(transaction=False)
    for bucket in range(keys.buckets):
        scripts.queue(pipe, "set_ttl", keys.build_keys(build, bucket), [seconds])
    pipe.execute()


def pointer(client: Any, keys: KeyLayout) -> dict[str, str] | None:
    """The live pointer (``build``, ``version``, ``buckets``, ``data_end_ts``); None if nothing is live."""
    found = client.hgetall(keys.pointer())
    return found or None


def live_data_end(client: Any, keys: KeyLayout) -> float | None:
    raw = client.hget(keys.pointer(), "data_end_ts")
    return None if raw is None else float(raw)


def wait_for_replicas(client: Any, timeout: float = REPLICA_WAIT_SECONDS) -> None:
    """Until every connected replica of every master has replicated what its master holds now (a
    failover then loses none of the build), or ``timeout``: a master whose replica is down or slow
    must not stop publishing; it is logged."""
    deadline = time.monotonic() + timeout
    while True:
        lagging = []
        infos = client.info("replication", target_nodes=client.PRIMARIES) if is_cluster(client) else {"": client.info("replication")}
        for node, info in infos.items():
            offset = int(info.get("master_repl_offset", 0))
            replicas = [value for name, value in info.items() if name.startswith("slave") and isinstance(value, dict)]
            lagging += [f"{node} replica {r.get('ip')}:{r.get('port')}" for r in replicas if int(r.get("offset", 0)) < offset]
        if not lagging:
            return
        if time.monotonic() >= deadline:
            log.warning("replicas still behind after %.0f s (a failover now could lose part of the build): %s",
                        timeout, ", ".join(lagging))
            return
        time.sleep(0.05)


def refusal(error: ScriptError, version: str) -> RecsysError:
    """The switch or rollback script's refusal as the exception an operator can act on."""
    from datetime import UTC, datetime

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
    if kind == "SWITCHLOCK":
        return PublishConflictError(f"version {version}: the switch lock lapsed before the switch (a stall?); publish again")
    if kind == "FUTURE":
        return IncompleteVersionError(f"version {version}'s data ends in the future; not switching")
    if kind == "INCOMPLETE":
        structure, found, expected = detail
        return IncompleteVersionError(
            f"version {version}: staged {structure} holds {found} entries, its meta records {expected}; "
            "not switching (the live version stays)"
        )
    if kind == "GONE":
        return RecsysError(f"version {version} is not kept (expired, or never published); see `recsys versions`")
    raise error


def _incomplete(version: str, states: list[BucketState]) -> IncompleteVersionError | None:
    problems = [problem for state in states for problem in state.problems()]
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return IncompleteVersionError(f"version {version}: {problems[0]}{more}; not switching (the live version stays)")


def switch(
    client: Any, build: Build, data_end_ts: float, latest_allowed_end_ts: float, keep_versions: int,
    kept_ttl_seconds: int, lock_ttl_seconds: float, lock_wait_seconds: float,
) -> None:
    """Make ``build`` live in one step, or raise and change nothing live (see the module docstring)."""
    keys = build.keys
    if is_cluster(client):
        wait_for_replicas(client)
    with SwitchLock(client, keys, lock_ttl_seconds, lock_wait_seconds) as lock:
        settle(client, keys)
        live = pointer(client, keys)
        if live is not None and live.get("build") == build.name:
            return  # a retry after the switch went through
        problem = _incomplete(build.version, build.states())
        if problem is not None:
            raise problem
        build.register()  # the sweep must find it, should this process die before the flip
        build.set_ttl(-1)
        try:
            scripts.run(
                client, "switch",
                [keys.owner(build.version), keys.switch_lock(), keys.pointer(), keys.meta(build.name),
                 keys.top_buys(build.name), keys.history()],
                [build.attempt, lock.token, build.name, build.version, repr(data_end_ts), repr(latest_allowed_end_ts),
                 keep_versions, kept_ttl_seconds, READER_GRACE_SECONDS, keys.tag],
            )
        except ScriptError as error:
            build.set_ttl(STAGING_TTL_SECONDS)
            raise refusal(error, build.version) from error
        if is_cluster(client):
            wait_for_replicas(client)  # the flip replicated before the replaced build gets a TTL
        settle(client, keys)


def settle(client: Any, keys: KeyLayout) -> None:
    """Give the bucket keys of the builds a switch replaced the TTLs it recorded, and make sure the
    live build's keys have none (the switch lock is held). Idempotent: a process dying half-way
    leaves the rest to the next settle."""
    live = pointer(client, keys)
    if live is None:
        return
    for build, (ttl, buckets) in json.loads(live.get("demote", "{}")).items():
        if buckets:
            set_bucket_ttls(client, keys.with_buckets(int(buckets)), build, int(ttl))
    # a failover that lost a flip's replication must not leave the live build expiring
    set_bucket_ttls(client, keys.with_buckets(int(live["buckets"])), live["build"], -1)
    scripts.run(client, "set_ttl", [keys.meta(live["build"]), keys.top_buys(live["build"])], [-1])
    client.hdel(keys.pointer(), "demote")


def sweep(client: Any, keys: KeyLayout, kept_ttl_seconds: int, lock_ttl_seconds: float, lock_wait_seconds: float) -> int:
    """Builds neither live, kept nor owned by a running attempt (a dead attempt's, or one a
    switch dropped) get ``READER_GRACE_SECONDS`` to live; the old layout's live keys (before
    builds) get the rollback window. Returns the builds swept."""
    swept = 0
    with SwitchLock(client, keys, lock_ttl_seconds, lock_wait_seconds):
        settle(client, keys)
        for name in OLD_LAYOUT_LIVE:
            old = f"{keys.tag}:{name}"
            if client.ttl(old) == -1:
                client.expire(old, kept_ttl_seconds)
                log.warning("the old layout's %s expires in %d s (replaced by builds, docs/scaling.md)", old, kept_ttl_seconds)
        live = pointer(client, keys) or {}
        kept = set(client.lrange(keys.history(), 0, -1))
        for name in client.zrange(keys.registry(), 0, -1):
            version, _, attempt = name.rpartition(".")
            if name == live.get("build") or name in kept or client.get(keys.owner(version)) == attempt:
                continue
            meta_buckets = client.hget(keys.meta(name), "buckets")
            for buckets in {keys.buckets, int(meta_buckets or keys.buckets)}:
                set_bucket_ttls(client, keys.with_buckets(buckets), name, READER_GRACE_SECONDS)
            for key in (keys.meta(name), keys.top_buys(name), keys.manifest(name)):
                if client.ttl(key) == -1 or client.ttl(key) > READER_GRACE_SECONDS:
                    client.expire(key, READER_GRACE_SECONDS)
            client.zrem(keys.registry(), name)
            swept += 1
    if swept:
        log.info("%d builds of publish attempts that no longer run expire in %d s", swept, READER_GRACE_SECONDS)
    return swept


def _batched(items: list, size: int) -> list[list]:
    return [items[first : first + size] for first in range(0, len(items), size)]


@dataclass(frozen=True)
class _RoundTrip:
    """The entries of one round trip's HSETs: ``chunks`` (key, first entry, entries) index
    ``ids`` and ``values``."""

    ids: pa.Array
    values: pa.Array
    chunks: list[tuple[str, int, int]]


def _round_trips(
    ids: pa.Array, values_of: Callable[[np.ndarray], pa.Array], order: np.ndarray, chunks: list[tuple[str, int, int]],
) -> Iterator[_RoundTrip]:
    """HSETS_PER_ROUND_TRIP chunks (key, first position in ``order``, entries) a round trip, each
    trip's ids and values taken when it is sent."""
    for trip in _batched(chunks, HSETS_PER_ROUND_TRIP):
        first = trip[0][1]
        rows = order[first : trip[-1][1] + trip[-1][2]]
        yield _RoundTrip(ids.take(pa.array(rows)), values_of(rows),
                         [(key, start - first, length) for key, start, length in trip])


def _resp_bulk_pairs(ids: pa.Array, values: pa.Array) -> pa.Array:
    """Each (id, value) as the two RESP bulk strings of an HSET's field and value
    (``$<bytes>\\r\\n<id>\\r\\n$<bytes>\\r\\n<value>\\r\\n``), in one large_binary array."""

    def bulk(strings: pa.Array) -> list:
        strings = strings.cast(pa.large_binary())
        length = pc.cast(pc.cast(pc.binary_length(strings), pa.large_string()), pa.large_binary())
        return [_LARGE_DOLLAR, length, _LARGE_CRLF, strings, _LARGE_CRLF]

    return pc.binary_join_element_wise(*bulk(ids), *bulk(values), pa.scalar(b"", pa.large_binary()))


_LARGE_DOLLAR = pa.scalar(b"$", pa.large_binary())
_LARGE_CRLF = pa.scalar(b"\r\n", pa.large_binary())


def _exchange(connection: Any, in_flight: tuple[bytes, int] | None, sending: tuple[bytes, int] | None) -> None:
    """Send ``sending``'s commands, then read the replies of ``in_flight`` (commands sent before,
    replies not read yet), each (packed commands, replies). A connection error is retried as the
    client's commands are: on a new connection, ``in_flight`` is sent again first (HSETs and their
    TTLs are idempotent). The first error reply is raised once every reply is read."""
    attempts = 0

    def exchange() -> None:
        nonlocal attempts
        attempts += 1
        if attempts > 1 and in_flight is not None:
            connection.send_packed_command([in_flight[0]])
        if sending is not None:
            connection.send_packed_command([sending[0]])
        if in_flight is not None:
            errors = []
            for _ in range(in_flight[1]):
                try:
                    connection.read_response()
                except ResponseError as error:
                    errors.append(error)
            if errors:
                raise errors[0]

    connection.retry.call_with_retry(exchange, lambda _error: connection.disconnect())
