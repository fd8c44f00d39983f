"""Who may call the recommendation API (``recsys.api``): API keys with scopes, and a write rate limit.

Keys come from ``RECSYS_API_KEYS`` (comma-separated ``scope:key`` pairs) and from the file named
by ``RECSYS_API_KEYS_FILE`` (the same entries, separated by commas or newlines: a mounted secret,
or an Airflow connection's password written to a file). Scope ``read`` may call the GET
endpoints and ``POST /carts/recommendations`` (read-only); ``write`` may also post events. Requests send the key in the ``X-API-Key`` header.

A key is never logged or shown: reprs name a key by its id, the first 12 hex digits of its
SHA-256, which is also all that the rate limiter's Redis keys hold. docs/security.md has the
threat model.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from recsys.core.settings import Settings
from recsys.storage.connection import UNAVAILABLE
from recsys.storage.live import LiveStore

log = logging.getLogger(__name__)

Scope = Literal["read", "write"]
SCOPES: tuple[Scope, ...] = ("read", "write")
MIN_KEY_LENGTH = 16
# what secrets.token_urlsafe makes, and anything else printable that fits in a header (no
# spaces, no commas: commas separate entries)
KEY_PATTERN = re.compile(r"[!-+\--~]+")
NEW_KEY_COMMAND = "python -c \"import secrets; print(secrets.token_urlsafe(32))\""
RATE_WINDOW_SECONDS = 60


class ApiKeyConfigError(ValueError):
    """RECSYS_API_KEYS / RECSYS_API_KEYS_FILE cannot be used; the message never holds a key."""


@dataclass(frozen=True)
class ApiKey:
    scope: Scope
    secret: bytes = field(repr=False)

    @property
    def key_id(self) -> str:
        """Names the key in logs and Redis without revealing it."""
        return hashlib.sha256(self.secret).hexdigest()[:12]

    def allows(self, scope: Scope) -> bool:
        return self.scope == "write" or scope == "read"

    def __repr__(self) -> str:
        return f"ApiKey(scope={self.scope!r}, key_id={self.key_id!r})"


@dataclass(frozen=True)
class ApiKeys:
    keys: tuple[ApiKey, ...] = ()

    def find(self, presented: str) -> ApiKey | None:
        """The configured key equal to ``presented``. Every key is compared in constant time, and
        all of them each time, so the answer's timing tells nothing about any key."""
        candidate = presented.encode()
        found = None
        for key in self.keys:
            if hmac.compare_digest(candidate, key.secret):
                found = key
        return found

    def count(self, scope: Scope) -> int:
        return sum(key.scope == scope for key in self.keys)

    def __repr__(self) -> str:
        return f"ApiKeys(read={self.count('read')}, write={self.count('write')})"


def new_api_key(scope: Scope = "write") -> str:
    """A fresh ``scope:key`` entry for RECSYS_API_KEYS (32 random bytes, URL-safe text).
    Meant to back a ``recsys api-key`` command."""
    if scope not in SCOPES:
        raise ApiKeyConfigError(f"scope {scope!r} is neither read nor write")
    return f"{scope}:{secrets.token_urlsafe(32)}"


def parse_api_keys(text: str, source: str) -> list[ApiKey]:
    """``scope:key`` entries separated by commas or newlines; blank entries are skipped. Errors
    name the entry by its position, never by its text (it may be a key)."""
    keys = []
    entries = [entry.strip() for entry in re.split(r"[,\n]", text)]
    for number, entry in enumerate((entry for entry in entries if entry), start=1):
        scope, colon, secret = entry.partition(":")
        where = f"{source} entry {number}"
        if not colon or scope.strip() not in SCOPES:
            raise ApiKeyConfigError(f"{where} is not scope:key with scope read or write, e.g. write:<key>")
        secret = secret.strip()
        if len(secret) < MIN_KEY_LENGTH or not KEY_PATTERN.fullmatch(secret):
            raise ApiKeyConfigError(
                f"{where}: a key must be at least {MIN_KEY_LENGTH} printable characters without spaces "
                f"(got {len(secret)} characters); make one with: {NEW_KEY_COMMAND}"
            )
        keys.append(ApiKey(scope.strip(), secret.encode()))  # type: ignore[arg-type]
    return keys


def load_api_keys(settings: Settings) -> ApiKeys:
    """The keys of RECSYS_API_KEYS and of the file RECSYS_API_KEYS_FILE names."""
    keys = parse_api_keys(settings.api_keys or "", "RECSYS_API_KEYS")
    path = settings.api_keys_file
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise ApiKeyConfigError(f"RECSYS_API_KEYS_FILE {path}: {error.strerror}") from error
        keys += parse_api_keys(text, f"RECSYS_API_KEYS_FILE {path}")
    seen: set[bytes] = set()
    for key in keys:
        if key.secret in seen:
            raise ApiKeyConfigError(f"API key {key.key_id} (SHA-256 prefix) is configured twice; list each key once")
        seen.add(key.secret)
    return ApiKeys(tuple(keys))


# --- FastAPI dependencies -----------------------------------------------------------------------

API_KEY_HEADER = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="A read key for GET endpoints and POST /carts/recommendations (unless RECSYS_API_PUBLIC_READS=true), "
    "a write key for events",
)


def require_scope(scope: Scope) -> Callable[..., Awaitable[ApiKey]]:
    """Dependency: the request's key, which must allow ``scope``; 401 without a known key, 403
    with a key of too small a scope."""

    async def check(request: Request, presented: Annotated[str | None, Security(API_KEY_HEADER)]) -> ApiKey:
        if not presented:
            raise HTTPException(status_code=401, detail="No API key: send one in the X-API-Key header")
        key = request.app.state.api_keys.find(presented)
        if key is None:
            raise HTTPException(status_code=401, detail="Unknown API key in the X-API-Key header")
        if not key.allows(scope):
            raise HTTPException(status_code=403, detail=f"This API key may only {key.scope}; this needs a {scope} key")
        return key

    return check


# --- write rate limit ---------------------------------------------------------------------------


class WriteRateLimiter:
    """At most ``per_minute`` writes per key in each clock minute (fixed windows).

    Counted in Redis, so every worker process shares the count: one ``INCR`` + ``EXPIRE`` in a
    MULTI per write (``LiveStore.count_write``, in the key id's bucket), each counter expiring two
    windows later. While Redis is unreachable each process counts on its own instead (the limit
    is then per process) so that writes, which go to Postgres, do not fail with the cache.
    """

    def __init__(self, store: LiveStore, per_minute: int, clock: Callable[[], float] = time.time) -> None:
        self.store, self.per_minute, self.clock = store, per_minute, clock
        self._local: dict[str, tuple[int, int]] = {}  # key id -> (window, writes), used while Redis is down

    async def retry_after(self, key: ApiKey) -> int | None:
        """Count one write of ``key``: None if it is within the limit, else the seconds to wait."""
        now = self.clock()
        window = int(now // RATE_WINDOW_SECONDS)
        try:
            writes = await self.store.count_write(key.key_id, window, 2 * RATE_WINDOW_SECONDS)
        except UNAVAILABLE:
            writes = self._count_locally(key, window)
        if writes <= self.per_minute:
            return None
        return max(1, math.ceil((window + 1) * RATE_WINDOW_SECONDS - now))

    def _count_locally(self, key: ApiKey, window: int) -> int:
        counted_window, writes = self._local.get(key.key_id, (window, 0))
        writes = writes + 1 if counted_window == window else 1
        self._local[key.key_id] = (window, writes)
        return writes
