"""What the cache does with no recsys code around it, measured with the same client the code uses:
the floors the benchmarks divide by (docs/benchmarks.md, docs/serving.md).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from recsys.storage.connection import async_client


def hset_seconds(client: Any, keys: list[str], value_bytes: int, fields: int, chunk: int, per_round_trip: int) -> float:
    """Seconds to HSET ``fields`` pre-built values of ``value_bytes``, spread evenly over the
    scratch hashes ``keys`` (publish's buckets), in publish's shape (``chunk`` fields per HSET,
    ``per_round_trip`` HSETs per pipelined round trip) and with no payload to build; the hashes
    are removed afterwards. On a cluster the round trip goes to every node holding a key."""
    value = b"v" * max(1, value_bytes)
    share = -(-fields // len(keys))
    try:
        start = time.perf_counter()
        pipe, queued = client.pipeline(transaction=False), 0
        for index, key in enumerate(keys):
            names = [str(number) for number in range(index * share, min((index + 1) * share, fields))]
            for first in range(0, len(names), chunk):
                part = names[first : first + chunk]
                pairs: list = [value] * (2 * len(part))
                pairs[0::2] = part
                pipe.hset(key, items=pairs)
                queued += 1
                if queued == per_round_trip:
                    pipe.execute()
                    pipe, queued = client.pipeline(transaction=False), 0
        if queued:
            pipe.execute()
        return time.perf_counter() - start
    finally:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.unlink(key)
        pipe.execute()


def memory_per_node(client: Any) -> dict[str, int]:
    """``used_memory`` of each server (each primary of a cluster), by address."""
    from recsys.storage.connection import is_cluster

    if is_cluster(client):
        return {node: int(info["used_memory"]) for node, info in client.info("memory", target_nodes=client.PRIMARIES).items()}
    return {"single": int(client.info("memory")["used_memory"])}


def hget_rate(url: str, reads: list[tuple[str, str]], connections: int, seconds: float) -> float:
    """HGETs/s of (key, field) ``reads`` from ``connections`` concurrent connections of redis-py's
    asyncio client (hiredis parsing), closed loop for ``seconds``."""

    async def run() -> float:
        client = async_client(url)
        done = 0
        deadline = time.perf_counter() + seconds

        async def loop(first: int) -> None:
            nonlocal done
            index = first
            while time.perf_counter() < deadline:
                await client.hget(*reads[index % len(reads)])
                index += connections
                done += 1

        try:
            await client.hget(*reads[0])  # a cluster client learns the slots once, before the load
            start = time.perf_counter()
            await asyncio.gather(*(loop(first) for first in range(connections)))
            return round(done / (time.perf_counter() - start), 1)
        finally:
            await client.aclose()

    return asyncio.run(run())


def plain_keys_bytes_per_entry(client: Any, key_prefix: str, pairs: list[tuple[str, str]]) -> float | None:
    """MEMORY USAGE per entry had these (field, value) pairs been written as one plain key each
    (``<key_prefix><field>``), the layout a hash of entries is measured against; removed again."""
    names = [key_prefix + field for field, _ in pairs]
    pipe = client.pipeline(transaction=False)
    try:
        for name, (_, value) in zip(names, pairs, strict=True):
            pipe.set(name, value)
        pipe.execute()
        for name in names:
            pipe.memory_usage(name, samples=0)
        usages = pipe.execute()
    finally:
        for name in names:
            pipe.delete(name)
        pipe.execute()
    return round(sum(usages) / len(usages), 1) if usages else None
