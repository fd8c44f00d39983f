"""Blocking reads of the live build (the CLI, the pipeline, benchmarks and tests); the API and the
look-up page read through ``recsys.storage.live``.

What a shop page reads: the live pointer names the build (``{p}:live`` HGET build), then one HGET
of the id's bucket (``user_recs``, ``similar_products``, ``bought_together``) or of the build's
top buys. Entries are JSON: ``{"user_id": 101, "recommended_products": [45, 78, 12]}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import msgspec

from recsys.storage import builds
from recsys.storage.keys import BUCKETED, INFO, KeyLayout, bucket_of, top_buys_field

_decode_json = msgspec.json.Decoder().decode
META_JSON_FIELDS = ("metrics", "params", "counts", "id_types", "bucket_tags", "model_family", "experiment")
# What readers outside the pipeline see of the meta; artifact paths on workers are internal, and
# the rules snapshot names segment members.
PUBLIC_META_FIELDS = (
    "version", "data_start", "data_end", "published_at", "metrics", "params", "counts", "id_types", "rules_fingerprint",
    "buckets", "model_family",
)


def decode_entry(raw: str | bytes | None) -> Any:
    """An entry's JSON (msgspec: a few times faster than json on the API's hot paths)."""
    return None if raw is None else _decode_json(raw)


def decode_meta(meta: dict[str, str]) -> dict | None:
    if not meta:
        return None
    decoded = {name: json.loads(value) if name in META_JSON_FIELDS else value for name, value in meta.items()}
    if "buckets" in decoded:
        decoded["buckets"] = int(decoded["buckets"])
    return decoded


def public_meta(meta: dict) -> dict:
    return {name: meta.get(name) for name in PUBLIC_META_FIELDS}


class LiveBuild:
    """The build the live pointer names (resolved once: a later switch does not move it)."""

    def __init__(self, client: Any, keys: KeyLayout, name: str, buckets: int, version: str) -> None:
        self.client, self.keys, self.name, self.version = client, keys.with_buckets(buckets), name, version

    def entry(self, structure: str, item_id: str) -> dict | None:
        return decode_entry(self.client.hget(self.keys.data(self.name, bucket_of(str(item_id), self.keys.buckets), structure), str(item_id)))

    def user_recommendations(self, user_id: str) -> dict | None:
        """The one lookup a shop page makes for a user."""
        return self.entry("user_recs", user_id)

    def similar_products(self, product_id: str) -> dict | None:
        return self.entry("similar_products", product_id)

    def bought_together(self, product_id: str) -> dict | None:
        return self.entry("bought_together", product_id)

    def top_buys(self, category: str | None = None) -> dict | None:
        return decode_entry(self.client.hget(self.keys.top_buys(self.name), top_buys_field(category)))

    def meta(self) -> dict | None:
        return decode_meta(self.client.hgetall(self.keys.meta(self.name)))

    def entries(self, structure: str) -> Iterator[tuple[str, dict]]:
        """Every (id, entry) of a bucketed structure, bucket by bucket (tests, checks, chaos)."""
        for bucket in range(self.keys.buckets):
            for owner, raw in self.client.hscan_iter(self.keys.data(self.name, bucket, structure), count=1000):
                yield owner, json.loads(raw)

    def fold_in_users(self) -> int:
        """Users the API added to the build's lists since its publish."""
        pipe = self.client.pipeline(transaction=False)
        for bucket in range(self.keys.buckets):
            pipe.hget(self.keys.data(self.name, bucket, INFO), "fold_ins")
        return sum(int(value or 0) for value in pipe.execute())

    def memory_usage(self, structure: str) -> int:
        """MEMORY USAGE (every field) of a bucketed structure, summed over its buckets."""
        pipe = self.client.pipeline(transaction=False)
        for bucket in range(self.keys.buckets):
            pipe.memory_usage(self.keys.data(self.name, bucket, structure), samples=0)
        return sum(usage or 0 for usage in pipe.execute())

    def entries_by_node(self, structure: str) -> dict[str, int]:
        """Entries of a bucketed structure each server holds (each primary of a cluster, by address)."""
        from recsys.storage.connection import is_cluster

        found: dict[str, int] = {}
        for bucket in range(self.keys.buckets):
            key = self.keys.data(self.name, bucket, structure)
            node = self.client.get_node_from_key(key).name if is_cluster(self.client) else "single"
            found[node] = found.get(node, 0) + self.client.hlen(key)
        return found

    def entry_counts(self) -> dict[str, int]:
        """Entries per bucketed structure, summed over the buckets."""
        pipe = self.client.pipeline(transaction=False)
        for bucket in range(self.keys.buckets):
            for structure in BUCKETED:
                pipe.hlen(self.keys.data(self.name, bucket, structure))
        found = pipe.execute()
        return {structure: sum(found[i::len(BUCKETED)]) for i, structure in enumerate(BUCKETED)}


def live_build(client: Any, keys: KeyLayout) -> LiveBuild | None:
    found = builds.pointer(client, keys)
    if found is None:
        return None
    return LiveBuild(client, keys, found["build"], int(found["buckets"]), found["version"])


def live_meta(client: Any, keys: KeyLayout) -> dict | None:
    live = live_build(client, keys)
    return None if live is None else live.meta()


def live_version(client: Any, keys: KeyLayout) -> str | None:
    return client.hget(keys.pointer(), "version")


def live_id_types(client: Any, keys: KeyLayout) -> dict | None:
    """How the live version publishes ids (``{"user": "int", "product": "str", ...}``), if known."""
    meta = live_meta(client, keys)
    return None if meta is None else meta.get("id_types")


def live_metrics(client: Any, keys: KeyLayout) -> dict | None:
    """The live version's evaluation metrics (``{"model": {...}, "popularity": {...}}``)."""
    meta = live_meta(client, keys)
    return None if meta is None else meta.get("metrics")


def all_keys(client: Any, keys: KeyLayout) -> Iterator[str]:
    """Every key of the layout (SCAN of every node): checks and cleanup, not hot paths."""
    for pattern in keys.patterns():
        yield from client.scan_iter(match=pattern, count=1000)


def delete_all(client: Any, keys: KeyLayout) -> int:
    """Remove every key of the layout (tests and benchmarks clean up their own prefix)."""
    found = sorted(set(all_keys(client, keys)))
    pipe = client.pipeline(transaction=False)
    for key in found:  # one key per command: a cluster refuses keys of several slots in one
        pipe.delete(key)
    pipe.execute()
    return len(found)
