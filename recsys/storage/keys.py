"""Every Redis key name, in one place: what lives where, and which hash slot it shares.

Two kinds of hash tag (docs/scaling.md):

- ``{p}`` (``p`` the prefix, default ``recsys``): the small keys every switch touches together, so
  one script on one slot checks and flips them: the live pointer, each build's meta and top buys,
  the attempt manifests, the owner and switch locks, the history of kept builds.
- ``{p:<b>:<salt>}``, one per bucket ``b`` of ``buckets`` (64 by default): the per-id data. A
  user's list and a product's lists live in the bucket of their id (CRC32 of the id, modulo the
  buckets), with the user's negative feedback and a write key's rate counter; the salt makes the
  buckets' slots evenly spaced over the 16,384 slots, so a cluster that splits its slots evenly
  between masters gets an even share of buckets on each.

A **build** is one publish attempt's copy of a version (``<version>.<attempt>``): its keys are
written once, never renamed, and live (no TTL) exactly while the live pointer names the build.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cache, cached_property

import numpy as np
import pyarrow as pa
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

# the per-id hashes of a build, each split over the buckets
BUCKETED = ("user_recs", "similar_products", "bought_together")
# a bucket's ``info`` hash: the entries each bucketed structure holds in it (written before the
# switch, checked against HLEN), and ``fold_ins``, the users the API added to its user_recs since
INFO = "info"
FOLD_INS = "fold_ins"
# the meta's ``counts`` field of each counted structure (top_buys is counted in the {p} slot)
COUNT_FIELDS = {
    "user_recs": "users",
    "similar_products": "products_with_similar",
    "bought_together": "products_with_bought_together",
    "top_buys": "top_buys_lists",
}
TOP_BUYS_ALL = "all"
# keys of the layout before builds and buckets (one {p} slot): an upgrade's first publish gives
# them a TTL instead of leaving them forever
OLD_LAYOUT_LIVE = ("user_recs", "similar_products", "top_buys", "bought_together", "meta")


def top_buys_field(category: str | None) -> str:
    return TOP_BUYS_ALL if category is None else f"category:{category}"


def build_name(version: str, attempt: str) -> str:
    return f"{version}.{attempt}"


def version_of(build: str) -> str:
    return build.rsplit(".", 1)[0]


def bucket_of(item_id: str, buckets: int) -> int:
    """The bucket of one id (as text): CRC32 of its UTF-8 bytes, modulo ``buckets``."""
    return zlib.crc32(item_id.encode()) % buckets


def _crc32_table() -> np.ndarray:
    """zlib's CRC32 (reflected polynomial 0xEDB88320) one byte at a time: entry ``b`` is the
    register after shifting byte ``b`` through eight times."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0xEDB88320), table >> 1).astype(np.uint32)
    return table


_CRC32_TABLE = _crc32_table()


def buckets_of(ids: pa.Array, buckets: int) -> np.ndarray:
    """:func:`bucket_of` of every id of a string array, computed column-wise: the CRC32 of all ids
    advances one byte position at a time over the ids still that long (a publish of a million
    users must not cost a million Python calls)."""
    ids = ids.cast(pa.large_string())
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if ids.null_count:
        raise ValueError("an id is null: every published entry needs one")
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int64)[ids.offset : ids.offset + len(ids) + 1]
    data = np.frombuffer(ids.buffers()[2], dtype=np.uint8) if ids.buffers()[2] is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    crc = np.full(len(ids), 0xFFFFFFFF, dtype=np.uint32)
    rows = np.arange(len(ids))
    for position in range(int(lengths.max(initial=0))):
        rows = rows[lengths[rows] > position]
        register = crc[rows]
        crc[rows] = _CRC32_TABLE[(register ^ data[starts[rows] + position]) & 0xFF] ^ (register >> 8)
    return (crc ^ np.uint32(0xFFFFFFFF)) % buckets


@cache
def _bucket_tags(prefix: str, buckets: int) -> tuple[str, ...]:
    """``{prefix:b:salt}`` per bucket, the salt the smallest whose slot falls in the bucket's
    1/buckets share of the slots (so buckets spread evenly over a cluster's masters)."""
    tags = []
    for bucket in range(buckets):
        low = bucket * REDIS_CLUSTER_HASH_SLOTS // buckets
        high = (bucket + 1) * REDIS_CLUSTER_HASH_SLOTS // buckets
        salt = 0
        while not low <= key_slot(f"{prefix}:{bucket}:{salt}".encode()) < high:
            salt += 1
        tags.append("{" + f"{prefix}:{bucket}:{salt}" + "}")
    return tuple(tags)


def glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


@dataclass(frozen=True)
class KeyLayout:
    prefix: str
    buckets: int = 64  # of builds published from now on; a build records its own in its meta

    @property
    def tag(self) -> str:
        return "{" + self.prefix + "}"

    def with_buckets(self, buckets: int) -> KeyLayout:
        return self if buckets == self.buckets else KeyLayout(self.prefix, buckets)

    # --- the {p} slot -----------------------------------------------------------------------------

    def pointer(self) -> str:
        """The live pointer: HASH ``build``, ``version``, ``buckets``, ``data_end_ts`` (and
        ``demote``, the kept builds' TTLs still to apply after a switch)."""
        return f"{self.tag}:live"

    def meta(self, build: str) -> str:
        return f"{self.tag}:meta:{build}"

    def top_buys(self, build: str) -> str:
        return f"{self.tag}:{build}:top_buys"

    def manifest(self, build: str) -> str:
        """What a publish attempt has staged: entries per structure, shard and bucket; its rules."""
        return f"{self.tag}:manifest:{build}"

    def owner(self, version: str) -> str:
        """The attempt that owns publishing ``version``."""
        return f"{self.tag}:owner:{version}"

    def switch_lock(self) -> str:
        """Held while a build's keys are persisted and switched live, a rollback, or the sweep."""
        return f"{self.tag}:lock:switch"

    def history(self) -> str:
        """LIST of the kept builds, newest first."""
        return f"{self.tag}:history"

    def registry(self) -> str:
        """ZSET of the builds whose keys may exist (score: when registered), for the sweep."""
        return f"{self.tag}:builds"

    def tune_lock(self) -> str:
        """Held by the tune that is keeping its result and maybe replacing the active params."""
        return f"{self.tag}:lock:tune"

    # --- the buckets ------------------------------------------------------------------------------

    @cached_property
    def bucket_tags(self) -> tuple[str, ...]:
        return _bucket_tags(self.prefix, self.buckets)

    def data(self, build: str, bucket: int, structure: str) -> str:
        """One bucket of a build's structure (``BUCKETED``, or ``INFO``)."""
        return f"{self.bucket_tags[bucket]}:{build}:{structure}"

    def build_keys(self, build: str, bucket: int) -> list[str]:
        """A bucket's keys of one build (one slot): its hashes and its info."""
        return [self.data(build, bucket, structure) for structure in (*BUCKETED, INFO)]

    def user_recs(self, build: str, user_id: str) -> str:
        return self.data(build, bucket_of(user_id, self.buckets), "user_recs")

    def negative(self, user_id: str) -> str:
        """The products ``user_id`` gave negative feedback on, as the API recorded them (beside
        the user's lists, so one script reads both)."""
        return f"{self.bucket_tags[bucket_of(user_id, self.buckets)]}:negative:{user_id}"

    def user_read(self, build: str, user_id: str) -> tuple[str, str]:
        """What a user's answer reads (``data(build, <the user's bucket>, "user_recs")`` and
        ``negative(user_id)``), the bucket worked out once: every user request needs both."""
        tag = self.bucket_tags[bucket_of(user_id, self.buckets)]
        return f"{tag}:{build}:user_recs", f"{tag}:negative:{user_id}"

    def rate(self, key_id: str, window: int) -> str:
        """Writes of one API key in one rate window."""
        return f"{self.bucket_tags[bucket_of(key_id, self.buckets)]}:rate:write:{key_id}:{window}"

    # --- scanning -------------------------------------------------------------------------------

    def patterns(self) -> tuple[str, str]:
        """SCAN patterns matching every key of the layout: the {p} slot's and the buckets'."""
        escaped = glob_escape(self.prefix)
        return "{" + escaped + "}*", "{" + escaped + ":*"

    def bucket_key_parts(self, key: str) -> tuple[str, str] | None:
        """(build, structure) of a bucket key of a build; None for other keys."""
        if not key.startswith("{" + self.prefix + ":"):
            return None
        _, rest = key.split("}:", 1)
        build, sep, structure = rest.rpartition(":")
        if not sep or structure not in (*BUCKETED, INFO) or rest.startswith(("negative:", "rate:")):
            return None
        return build, structure

    def tagged_build(self, key: str) -> tuple[str, str] | None:
        """(build, kind) of a {p}-slot key of a build: meta, top_buys or manifest; else None."""
        head = self.tag + ":"
        if not key.startswith(head):
            return None
        rest = key[len(head):]
        for kind in ("meta", "manifest"):
            if rest.startswith(kind + ":"):
                return rest[len(kind) + 1:], kind
        if rest.endswith(":top_buys") and rest.count(":") == 1:
            return rest.rsplit(":", 1)[0], "top_buys"
        return None
