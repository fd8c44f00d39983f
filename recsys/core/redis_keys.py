"""The Redis key layout and the read side, shared by publish, the Airflow plugin and readers.

All keys share the hash tag ``{prefix}`` so they live in one slot and the live switch (several
RENAMEs in one MULTI/EXEC) also works on Redis Cluster.

Live keys (what shop pages read):

- ``{recsys}:user_recs``        HASH user_id -> ``{"user_id": 101, "recommended_products": [45, 78]}``
- ``{recsys}:similar_products`` HASH product_id -> ``{"product_id": 45, "similar_products": [78, 12]}``
- ``{recsys}:bought_together``  HASH product_id -> ``{"product_id": 45, "bought_together": [78, 12]}``
  (complements from co-purchases, filled with similar products; ``recsys.ml.co_purchase``)
- ``{recsys}:top_buys``         HASH ``all`` or ``category:<name>`` -> ``{"category": null, "top_buys": [..]}``
- ``{recsys}:meta``             HASH version, data window, published_at, metrics, params, counts,
  the merchandising rules' fingerprint

Everything else under the prefix carries a TTL (docs/reliability.md, invariant I3):

- ``{recsys}:staging:<version>:<attempt>:<structure>``  one publish attempt's keys before the switch;
  ``<attempt>`` names the attempt, so concurrent or retried publishers never share a key
- ``{recsys}:staging:<version>:<attempt>:manifest``     what that attempt has staged (entry counts)
- ``{recsys}:owner:<version>``                         the attempt that owns publishing ``version``
- ``{recsys}:v:<version>:<structure>``                 a replaced version, kept for rollback
- ``{recsys}:history``                                 LIST of kept versions, newest first
- ``{recsys}:negative:<user_id>``                      SET of products the user gave negative feedback
  on through the API: filtered out of every list served, across publish switches (TTL
  ``RECSYS_NEGATIVE_FEEDBACK_TTL_SECONDS``, renewed on each of the user's events)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from recsys.core.settings import Settings

STRUCTURES = ("user_recs", "similar_products", "top_buys", "bought_together", "meta")  # meta last
# the hashes of entries and, in ``meta.counts``, the count each must hold (checked at the switch)
COUNTED_STRUCTURES = {
    "user_recs": "users",
    "similar_products": "products_with_similar",
    "top_buys": "top_buys_lists",
    "bought_together": "products_with_bought_together",
}
# counted structures added to the layout later: a version published before one existed records no
# count for it and has none of it, which is complete (it can still be rolled back to)
LATER_COUNTED_STRUCTURES = frozenset({"bought_together"})
# meta field: users the API added to the live ``user_recs`` after the publish (fold-ins of new users)
FOLD_IN_USERS = "fold_in_users"
TOP_BUYS_ALL = "all"


def top_buys_field(category: str | None) -> str:
    return TOP_BUYS_ALL if category is None else f"category:{category}"


@dataclass(frozen=True)
class KeyLayout:
    prefix: str

    @property
    def tag(self) -> str:
        return "{" + self.prefix + "}"

    def live(self, structure: str) -> str:
        return f"{self.tag}:{structure}"

    def staging(self, version: str, attempt: str, structure: str) -> str:
        return f"{self.tag}:staging:{version}:{attempt}:{structure}"

    def staging_pattern(self) -> str:
        return f"{self.tag}:staging:*"

    @staticmethod
    def staging_owner(key: str) -> tuple[str, str | None]:
        """(version, attempt) of a staging key; attempt None for keys of the layout before attempts."""
        parts = key.split(":")
        return parts[2], (parts[3] if len(parts) == 5 else None)

    def owner(self, version: str) -> str:
        return f"{self.tag}:owner:{version}"

    def previous(self, version: str, structure: str) -> str:
        return f"{self.tag}:v:{version}:{structure}"

    def history(self) -> str:
        return f"{self.tag}:history"

    def negative(self, user_id: str) -> str:
        """The products ``user_id`` gave negative feedback on, as the API recorded them."""
        return f"{self.tag}:negative:{user_id}"

    def tune_lock(self) -> str:
        """Held by the tune that is keeping its result and maybe replacing the active params."""
        return f"{self.tag}:lock:tune"

    def pattern(self) -> str:
        """Every key of this layout (for SCAN-based cleanup)."""
        return f"{self.tag}:*"


# A pooled connection to a Redis that restarted is stale: its first command fails with "Connection
# closed by server". Retried once on a new connection, that is no outage; a Redis that is really
# down fails the retry too, at once (connection refused). Connection errors only: a timed-out
# write may have been applied, and must not be applied twice.
RETRIED_ERRORS = [redis.ConnectionError]


def redis_client(settings: Settings) -> redis.Redis:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        settings.require_redis_url,
        decode_responses=True,
        socket_timeout=30,
        socket_connect_timeout=5,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=RETRIED_ERRORS,
    )


def async_redis_client(settings: Settings, socket_timeout: float = 5, connect_timeout: float = 2) -> aioredis.Redis:
    """The asyncio client of the API and the look-up page (the same retry of a stale connection)."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return aioredis.Redis.from_url(
        settings.require_redis_url,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(NoBackoff(), 1),
        retry_on_error=RETRIED_ERRORS,
    )


def layout(settings: Settings) -> KeyLayout:
    return KeyLayout(settings.redis_prefix)


# A slot is (hash key, field): the one HGET that answers a page's question.
Slot = tuple[str, str]


def user_recs_slot(keys: KeyLayout, user_id: str) -> Slot:
    return keys.live("user_recs"), str(user_id)


def similar_slot(keys: KeyLayout, product_id: str) -> Slot:
    return keys.live("similar_products"), str(product_id)


def bought_together_slot(keys: KeyLayout, product_id: str) -> Slot:
    return keys.live("bought_together"), str(product_id)


def top_buys_slot(keys: KeyLayout, category: str | None) -> Slot:
    return keys.live("top_buys"), top_buys_field(category)


def decode_entry(raw: str | None) -> Any:
    return None if raw is None else json.loads(raw)


META_JSON_FIELDS = ("metrics", "params", "counts", "id_types")
# What readers outside the pipeline see of the meta hash; artifact paths on workers are internal.
PUBLIC_META_FIELDS = (
    "version", "data_start", "data_end", "published_at", "metrics", "params", "counts", "id_types", "rules_fingerprint",
)


def decode_meta(meta: dict[str, str]) -> dict | None:
    if not meta:
        return None
    return {name: json.loads(value) if name in META_JSON_FIELDS else value for name, value in meta.items()}


def public_meta(meta: dict) -> dict:
    return {name: meta.get(name) for name in PUBLIC_META_FIELDS}


# Blocking reads (CLI, pipeline, tests) ...


def user_recommendations(client: redis.Redis, keys: KeyLayout, user_id: str) -> dict | None:
    """The one lookup a shop page makes: ``HGET {prefix}:user_recs <user_id>``."""
    return decode_entry(client.hget(*user_recs_slot(keys, user_id)))


def similar_products(client: redis.Redis, keys: KeyLayout, product_id: str) -> dict | None:
    return decode_entry(client.hget(*similar_slot(keys, product_id)))


def bought_together(client: redis.Redis, keys: KeyLayout, product_id: str) -> dict | None:
    return decode_entry(client.hget(*bought_together_slot(keys, product_id)))


def top_buys(client: redis.Redis, keys: KeyLayout, category: str | None = None) -> dict | None:
    return decode_entry(client.hget(*top_buys_slot(keys, category)))


def live_meta(client: redis.Redis, keys: KeyLayout) -> dict | None:
    return decode_meta(client.hgetall(keys.live("meta")))


# ... and the same on an asyncio client (the HTTP API and the Airflow look-up page).


async def read_entry(client: aioredis.Redis, slot: Slot) -> Any:
    return decode_entry(await client.hget(*slot))


async def read_meta(client: aioredis.Redis, keys: KeyLayout) -> dict | None:
    return decode_meta(await client.hgetall(keys.live("meta")))


def live_id_types(client: redis.Redis, keys: KeyLayout) -> dict | None:
    """How the live version publishes ids (``{"user": "int", "product": "str", ...}``), if known."""
    raw = client.hget(keys.live("meta"), "id_types")
    return None if raw is None else json.loads(raw)


def live_metrics(client: redis.Redis, keys: KeyLayout) -> dict | None:
    """The live version's evaluation metrics (``{"model": {...}, "popularity": {...}}``)."""
    raw = client.hget(keys.live("meta"), "metrics")
    return None if raw is None else json.loads(raw)


def delete_all(client: redis.Redis, keys: KeyLayout) -> int:
    """Remove every key of the layout (tests and benchmarks clean up their own prefix)."""
    found = list(client.scan_iter(match=keys.pattern(), count=1000))
    return client.delete(*found) if found else 0
