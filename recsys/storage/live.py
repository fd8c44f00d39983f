"""What the API and the look-up page read and write in Redis (asyncio), single node or cluster.

Every request first needs the live build: the pointer is cached for at most
``max_pointer_age`` seconds (default 1), so the hot path is one round trip to the id's bucket. A
build's keys never change once written (but for the API's own fold-ins), and a replaced build
stays readable for at least ``READER_GRACE_SECONDS``, so an answer read through a pointer up to a
second old is still one whole version. When a cached pointer finds no entry, the pointer is read
again before the caller concludes the id has none (the build may have been switched away).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from recsys.core.settings import Settings
from recsys.storage import scripts
from recsys.storage.connection import async_client
from recsys.storage.keys import INFO, KeyLayout, bucket_of
from recsys.storage.reads import decode_entry, decode_meta

MAX_POINTER_AGE_SECONDS = 1.0


@dataclass(frozen=True)
class Pointer:
    """The live build as one read of the pointer saw it."""

    build: str
    version: str
    keys: KeyLayout  # with the build's bucket count
    read_at: float  # time.monotonic()

    def key(self, structure: str, item_id: str) -> str:
        return self.keys.data(self.build, bucket_of(item_id, self.keys.buckets), structure)


class LiveStore:
    """One process' client of the cache and its view of the live build."""

    def __init__(self, settings: Settings, max_pointer_age: float = MAX_POINTER_AGE_SECONDS) -> None:
        self.client = async_client(settings.require_redis_url)
        self.keys = KeyLayout(settings.redis_prefix, settings.redis_buckets)
        self.max_pointer_age = max_pointer_age
        self._pointer: Pointer | None = None
        self._top_buys: tuple[str, dict[str, dict]] | None = None  # build -> field -> entry

    async def aclose(self) -> None:
        await self.client.aclose()

    async def pointer(self, fresh: bool = False) -> Pointer | None:
        """The live build (None: nothing is live); read again when older than ``max_pointer_age``."""
        cached = self._cached_pointer()
        return cached if cached is not None and not fresh else await self._read_pointer()

    def _cached_pointer(self) -> Pointer | None:
        cached = self._pointer
        if cached is not None and time.monotonic() - cached.read_at < self.max_pointer_age:
            return cached
        return None

    async def _read_pointer(self) -> Pointer | None:
        found = await self.client.hgetall(self.keys.pointer())
        self._pointer = None if not found else Pointer(
            found["build"], found["version"], self.keys.with_buckets(int(found["buckets"])), time.monotonic()
        )
        return self._pointer

    async def _read_live(self, read: Callable[[Pointer], Awaitable[tuple]]) -> tuple[Pointer | None, tuple | None]:
        """``read(pointer)`` of the live build; its first value None (not found) through a cached
        pointer is read again through a fresh one, in case the build was switched away meanwhile."""
        pointer = self._cached_pointer()
        fresh = pointer is None
        if fresh:
            pointer = await self._read_pointer()
        found = None
        while pointer is not None:
            found = await read(pointer)
            if found[0] is not None or fresh:
                return pointer, found
            fresh, stale = True, pointer
            pointer = await self._read_pointer()
            if pointer is not None and pointer.build == stale.build:
                return pointer, found
        return None, found

    async def meta(self, pointer: Pointer) -> dict | None:
        return decode_meta(await self.client.hgetall(self.keys.meta(pointer.build)))

    async def user_entry(self, user_id: str) -> tuple[Pointer | None, dict | None, set[str]]:
        """The live build, the user's list in it (None: none published or folded in) and the
        products the user gave negative feedback on since: one script on the user's bucket."""

        async def read(pointer: Pointer) -> tuple:
            found = await scripts.run_async(self.client, "user_entry", pointer.keys.user_read(pointer.build, user_id), [user_id])
            # the list alone (or nil) without negative feedback, else [list or nil, negative products]
            return tuple(found) if isinstance(found, list) else (found, ())

        pointer, found = await self._read_live(read)
        if found is None:
            return pointer, None, set()
        return pointer, decode_entry(found[0]), set(found[1])

    async def entry(self, structure: str, item_id: str) -> tuple[Pointer | None, dict | None]:
        """A product's ``similar_products`` or ``bought_together`` entry in the live build."""
        pointer, raw = await self.raw_entry(structure, item_id)
        return pointer, decode_entry(raw)

    async def raw_entry(self, structure: str, item_id: str) -> tuple[Pointer | None, str | None]:
        """An id's entry of a bucketed structure in the live build, as stored (JSON text)."""

        async def read(pointer: Pointer) -> tuple:
            return (await self.client.hget(pointer.key(structure, item_id), item_id),)

        pointer, found = await self._read_live(read)
        return pointer, None if found is None else found[0]

    async def entries(self, build: str, buckets: int, structures: tuple[str, ...], item_ids: list[str]) -> dict[str, list[dict | None]]:
        """Several products' entries of each structure of one build: one HMGET per bucket and
        structure, sent together."""
        raw = await self.raw_entries(build, buckets, structures, item_ids)
        return {structure: [decode_entry(entry) for entry in found] for structure, found in raw.items()}

    async def raw_entries(self, build: str, buckets: int, structures: tuple[str, ...], item_ids: list[str]) -> dict[str, list[str | None]]:
        """``entries`` as stored (JSON text)."""
        keys = self.keys.with_buckets(buckets)
        by_key: dict[str, list[str]] = defaultdict(list)
        for structure in structures:
            for item_id in item_ids:
                by_key[keys.data(build, bucket_of(item_id, buckets), structure)].append(item_id)
        async with self.client.pipeline(transaction=False) as pipe:
            for key, ids in by_key.items():
                pipe.hmget(key, ids)
            answers = await pipe.execute()
        found = {(key, item_id): raw for (key, ids), values in zip(by_key.items(), answers, strict=True)
                 for item_id, raw in zip(ids, values, strict=True)}
        return {
            structure: [found[keys.data(build, bucket_of(i, buckets), structure), i] for i in item_ids]
            for structure in structures
        }

    async def top_buys(self, build: str) -> dict[str, dict]:
        """Every top-buys list of the build (``all``, ``category:<name>``), read once per build."""
        cached = self._top_buys
        if cached is None or cached[0] != build:
            raw = await self.client.hgetall(self.keys.top_buys(build))
            cached = self._top_buys = (build, {field: json.loads(value) for field, value in raw.items()})
        return cached[1]

    async def write_fold_in(self, build: str, buckets: int, user_id: str, entry: dict) -> bool:
        """The user's refreshed list into the build's bucket, counted in its info; False if the
        build is gone."""
        keys = self.keys.with_buckets(buckets)
        bucket = bucket_of(user_id, buckets)
        added = await scripts.run_async(
            self.client, "fold_in", [keys.data(build, bucket, "user_recs"), keys.data(build, bucket, INFO)],
            [user_id, json.dumps(entry, separators=(",", ":"))],
        )
        return added != -1

    async def remember_negatives(self, user_id: str, products: list[str], ttl_seconds: int) -> None:
        """Add to the user's negative feedback set and renew its TTL in one step (one slot): the
        key never exists without a TTL (invariant I3). The set sits in the user's bucket of the
        live build's layout, beside the user's list (a build published with another bucket
        count starts with empty sets: docs/scaling.md)."""
        pointer = await self.pointer()
        key = (self.keys if pointer is None else pointer.keys).negative(user_id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.sadd(key, *products)
            pipe.expire(key, ttl_seconds)
            await pipe.execute()

    async def count_write(self, key_id: str, window: int, ttl_seconds: int) -> int:
        """One more write of an API key in a rate window; the writes counted so far."""
        counter = self.keys.rate(key_id, window)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.incr(counter)
            pipe.expire(counter, ttl_seconds)
            writes, _ = await pipe.execute()
        return int(writes)

    async def fold_in_users(self, build: str, buckets: int) -> int:
        keys = self.keys.with_buckets(buckets)
        async with self.client.pipeline(transaction=False) as pipe:
            for bucket in range(buckets):
                pipe.hget(keys.data(build, bucket, INFO), "fold_ins")
            return sum(int(value or 0) for value in await pipe.execute())
