"""The Redis key layout and the read side, shared by publish, the Airflow plugin and readers.

All keys share the hash tag ``{prefix}`` so they live in one slot and the live switch (several
RENAMEs in one MULTI/EXEC) also works on Redis Cluster.

Live keys (what shop pages read):

- ``{recsys}:user_recs``        HASH user_id -> ``{"user_id": 101, "recommended_products": [45, 78]}``
- ``{recsys}:similar_products`` HASH product_id -> ``{"product_id": 45, "similar_products": [78, 12]}``
- ``{recsys}:top_buys``         HASH ``all`` or ``category:<name>`` -> ``{"category": null, "top_buys": [..]}``
- ``{recsys}:meta``             HASH version, data window, published_at, metrics, params, counts

A publish writes ``{recsys}:staging:<version>:<structure>`` and then switches them live at once;
the replaced live keys move to ``{recsys}:v:<old version>:<structure>`` and expire after a TTL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

from recsys.settings import Settings

STRUCTURES = ("user_recs", "similar_products", "top_buys", "meta")
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

    def staging(self, version: str, structure: str) -> str:
        return f"{self.tag}:staging:{version}:{structure}"

    def previous(self, version: str, structure: str) -> str:
        return f"{self.tag}:v:{version}:{structure}"

    def pattern(self) -> str:
        """Every key of this layout (for SCAN-based cleanup)."""
        return f"{self.tag}:*"


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.require_redis_url,
        decode_responses=True,
        socket_timeout=30,
        socket_connect_timeout=5,
        health_check_interval=30,
    )


def layout(settings: Settings) -> KeyLayout:
    return KeyLayout(settings.redis_prefix)


def _loads(raw: str | None) -> Any:
    return None if raw is None else json.loads(raw)


def user_recommendations(client: redis.Redis, keys: KeyLayout, user_id: str) -> dict | None:
    """The one lookup a shop page makes: ``HGET {prefix}:user_recs <user_id>``."""
    return _loads(client.hget(keys.live("user_recs"), str(user_id)))


def similar_products(client: redis.Redis, keys: KeyLayout, product_id: str) -> dict | None:
    return _loads(client.hget(keys.live("similar_products"), str(product_id)))


def top_buys(client: redis.Redis, keys: KeyLayout, category: str | None = None) -> dict | None:
    return _loads(client.hget(keys.live("top_buys"), top_buys_field(category)))


META_JSON_FIELDS = ("metrics", "params", "counts")


def live_meta(client: redis.Redis, keys: KeyLayout) -> dict | None:
    meta = client.hgetall(keys.live("meta"))
    if not meta:
        return None
    for name in META_JSON_FIELDS:
        if name in meta:
            meta[name] = json.loads(meta[name])
    return meta


def live_metrics(client: redis.Redis, keys: KeyLayout) -> dict | None:
    """The live version's evaluation metrics (``{"model": {...}, "popularity": {...}}``)."""
    raw = client.hget(keys.live("meta"), "metrics")
    return None if raw is None else json.loads(raw)


def delete_all(client: redis.Redis, keys: KeyLayout) -> int:
    """Remove every key of the layout (tests and benchmarks clean up their own prefix)."""
    found = list(client.scan_iter(match=keys.pattern(), count=1000))
    return client.delete(*found) if found else 0
