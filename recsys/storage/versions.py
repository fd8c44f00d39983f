"""The live and kept builds: listing them, rolling back, and the invariants every state must
satisfy (docs/reliability.md: I1 a complete live build, I3 nothing without a TTL but the live set).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from recsys.core.errors import IncompleteVersionError, RecsysError
from recsys.storage import builds, scripts
from recsys.storage.connection import ScriptError
from recsys.storage.keys import BUCKETED, COUNT_FIELDS, KeyLayout, version_of
from recsys.storage.locks import SwitchLock
from recsys.storage.reads import all_keys, decode_meta

log = logging.getLogger(__name__)

LIVE_TTL = -1  # what TTL answers for a key without expiry


@dataclass(frozen=True)
class VersionInfo:
    role: str  # live | kept
    version: str
    build: str
    data_end: str | None
    published_at: str | None
    counts: dict
    ttl_seconds: int  # -1 for the live build
    complete: bool


def _info(client: Any, keys: KeyLayout, role: str, build: str) -> VersionInfo | None:
    meta = decode_meta(client.hgetall(keys.meta(build)))
    if meta is None:
        return None
    return VersionInfo(
        role=role,
        version=meta.get("version", version_of(build)),
        build=build,
        data_end=meta.get("data_end"),
        published_at=meta.get("published_at"),
        counts=meta.get("counts", {}),
        ttl_seconds=client.ttl(keys.meta(build)),
        complete=not build_problems(client, keys, build, meta),
    )


def versions(client: Any, keys: KeyLayout) -> list[VersionInfo]:
    """The live build, then the kept ones (newest first) that still exist."""
    found = []
    live = builds.pointer(client, keys)
    if live is not None:
        info = _info(client, keys, "live", live["build"])
        if info is not None:
            found.append(info)
    for build in client.lrange(keys.history(), 0, -1):
        info = _info(client, keys, "kept", build)
        if info is not None:
            found.append(info)
    return found


def build_problems(client: Any, keys: KeyLayout, build: str, meta: dict) -> list[str]:
    """How a build is incomplete: a bucket whose hashes do not hold what its info records, or
    infos and top buys that do not add up to the meta's counts."""
    keys = keys.with_buckets(int(meta.get("buckets", keys.buckets)))
    states = builds.bucket_states(client, keys, build)
    problems = [problem for state in states for problem in state.problems()]
    counts = meta.get("counts") or {}
    for structure in BUCKETED:
        recorded = sum(state.recorded[structure] for state in states if state.has_info)
        if recorded != counts.get(COUNT_FIELDS[structure]):
            problems.append(f"the infos of {structure} record {recorded} entries, the meta {counts.get(COUNT_FIELDS[structure])}")
    top_buys = client.hlen(keys.top_buys(build))
    if top_buys != counts.get(COUNT_FIELDS["top_buys"]):
        problems.append(f"top_buys holds {top_buys} lists, the meta records {counts.get(COUNT_FIELDS['top_buys'])}")
    return problems


def live_problems(client: Any, keys: KeyLayout) -> list[str]:
    """Invariant I1: either nothing is live, or the live build is complete and none of its keys
    has a TTL. Empty when it holds."""
    live = builds.pointer(client, keys)
    if live is None:
        return []
    build = live["build"]
    meta = decode_meta(client.hgetall(keys.meta(build)))
    if meta is None:
        return [f"the live pointer names build {build}, whose meta is gone"]
    problems = build_problems(client, keys, build, meta)
    live_keys = keys.with_buckets(int(meta["buckets"]))
    states = builds.bucket_states(client, live_keys, build)
    problems += [
        f"live {name} of bucket {state.bucket} has a TTL ({ttl} s)"
        for state in states for name, ttl in state.ttls.items() if ttl >= 0
    ]
    for key in (keys.meta(build), keys.top_buys(build)):
        if client.ttl(key) >= 0:
            problems.append(f"live {key} has a TTL")
    return problems


def live_set(client: Any, keys: KeyLayout) -> set[str]:
    """The keys that live without a TTL: the pointer and every key of the live build."""
    live = builds.pointer(client, keys)
    if live is None:
        return set()
    build, build_keys = live["build"], keys.with_buckets(int(live["buckets"]))
    found = {keys.pointer(), keys.meta(build), keys.top_buys(build)}
    for bucket in range(build_keys.buckets):
        found.update(build_keys.build_keys(build, bucket))
    return found


def keys_without_ttl(client: Any, keys: KeyLayout) -> list[str]:
    """Invariant I3: keys of the layout that would live forever, other than the live set."""
    allowed = live_set(client, keys)
    return sorted(key for key in set(all_keys(client, keys)) if key not in allowed and client.ttl(key) == LIVE_TTL)


def rollback(
    client: Any, keys: KeyLayout, kept_ttl_seconds: int, version: str | None, lock_ttl_seconds: float,
    lock_wait_seconds: float,
) -> str:
    """Make ``version`` (default: the newest kept one) live again; returns it."""
    kept = [info for info in versions(client, keys) if info.role == "kept"]
    chosen = [info for info in kept if version is None or version in (info.version, info.build)]
    if not chosen:
        if version is None:
            raise RecsysError("no kept version to roll back to (see `recsys versions`); `recsys republish` "
                              "publishes a finished run again from its artifacts")
        raise RecsysError(f"version {version} is not kept (expired, or never published); see `recsys versions`")
    target = chosen[0]
    meta = decode_meta(client.hgetall(keys.meta(target.build))) or {}
    target_keys = keys.with_buckets(int(meta.get("buckets", keys.buckets)))
    with SwitchLock(client, keys, lock_ttl_seconds, lock_wait_seconds) as lock:
        builds.settle(client, keys)
        problems = build_problems(client, keys, target.build, meta)
        if problems:
            raise IncompleteVersionError(f"kept version {target.version} is incomplete ({problems[0]}); not rolling back")
        builds.set_bucket_ttls(client, target_keys, target.build, -1)
        try:
            scripts.run(
                client, "rollback",
                [keys.switch_lock(), keys.pointer(), keys.history(), keys.meta(target.build), keys.top_buys(target.build)],
                [lock.token, target.build, kept_ttl_seconds, keys.tag],
            )
        except ScriptError as error:
            remaining = client.ttl(keys.meta(target.build))
            builds.set_bucket_ttls(client, target_keys, target.build, remaining if remaining > 0 else builds.READER_GRACE_SECONDS)
            raise builds.refusal(error, target.version) from error
        builds.settle(client, keys)
    # what else lost its place (the keys of a live build whose pointer was lost) gets a TTL
    builds.sweep(client, keys, kept_ttl_seconds, lock_ttl_seconds, lock_wait_seconds)
    log.warning("rolled back: version %s is live again", target.version)
    return target.version

