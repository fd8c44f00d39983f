"""All access to the cache Redis: the key layout (``keys``), the client of a single node or a
cluster (``connection``), the Lua scripts (``lua/``), the owner and switch locks (``locks``),
publishing a build and switching it live (``builds``), the live and kept builds and their
invariants (``versions``), and the reads of the CLI (``reads``) and of the API (``live``).

No other package of recsys imports redis (checked by import-linter in ``make lint``).
"""

from __future__ import annotations

from typing import Any

from recsys.core.settings import Settings
from recsys.storage.connection import sync_client
from recsys.storage.keys import KeyLayout


def layout(settings: Settings) -> KeyLayout:
    return KeyLayout(settings.redis_prefix, settings.redis_buckets)


def connect(settings: Settings) -> tuple[Any, KeyLayout]:
    """A blocking client of the configured Redis (single node or cluster) and the key layout."""
    return sync_client(settings.require_redis_url), layout(settings)
