"""Recommendation API: the live version in Redis over HTTP, cold-start fallbacks, real-time events.

Reads go to the live keys only (``redis_keys.KeyLayout.live``), so a publish switch is seen at once.
The hot path is one Redis round trip: ``MULTI; HGET meta version; HGET user_recs <id>; EXEC``
gives the user's list and the version it belongs to. The version also tells whether the
in-process copy of the live model (item factors, id maps) is still current; a new version is
loaded once, off the event loop.

Lists come from the published ones while they can fill the requested page after filtering
(request excludes, category); deeper pages and cold-start users are ranked on request from the
live factors, in a thread pool so a fold-in never blocks other requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
import psycopg
import pyarrow.parquet as pq
import redis.asyncio as aioredis
import scipy.sparse as sp
import typer
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Security
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from swagger_ui_bundle import swagger_ui_path

from recsys.core import db, ids, redis_keys
from recsys.core.ids import IdTypes, id_out
from recsys.core.layout import EXCLUDE, FULL, ITEMS, USERS, published_artifacts
from recsys.core.params import PipelineParams
from recsys.core.settings import Settings
from recsys.ml.als import load_factors
from recsys.ml.ranking import als_model, similar_items, top_buys_order
from recsys.ml.weighting import BM25_FLOOR, BM25_K1, interaction_weights, scale_confidence
from recsys.serving.security import (
    NEW_KEY_COMMAND,
    ApiKey,
    ApiKeyConfigError,
    WriteRateLimiter,
    load_api_keys,
    require_scope,
)

log = logging.getLogger(__name__)

MAX_N = 100
MAX_OFFSET = 1_000
MAX_EXCLUDE = 500
MAX_ID_LENGTH = 128
# printable ids without commas (``exclude`` is a comma-separated list of them)
ID_PATTERN = r"^[^\x00-\x1f\x7f,]+$"
FOLD_IN_MAX_EVENTS = 5_000
WRITE_ATTEMPTS = 3
PENDING_REFRESH_BATCH = 100
DOCS_ASSETS = "/docs-assets"
SECONDS_PER_DAY = 86_400.0

Source = Literal["model", "fold_in", "popular"]
ProductId = int | str
T = TypeVar("T")


# --- the live model in memory -------------------------------------------------------------------


@dataclass(frozen=True)
class LiveModel:
    """What ranking on request needs from one published version (read-only once built)."""

    version: str
    params: PipelineParams
    data_start: datetime
    model: Any  # implicit ALS around the version's factors
    user_index: dict[str, int]
    item_ids: list[str]
    item_index: dict[str, int]
    id_types: IdTypes
    active: np.ndarray  # bool per item
    category: np.ndarray  # object per item (None if uncategorised)
    categories: frozenset[str]  # categories with an active product: the ones with top buys
    popular: np.ndarray  # active item indices in top-buys order
    exclude: sp.csr_matrix  # who already has what in the window
    document_frequency: np.ndarray  # users per item in the window, for bm25 fold-ins

    def product_out(self, index: int) -> ProductId:
        return id_out(self.id_types.product)(self.item_ids[index])

    def user_id_out(self, user_id: str) -> ProductId:
        """The form publish gives this id (requests were checked with :func:`_check_user_id`)."""
        return id_out(self.id_types.user)(user_id)


def load_live_model(meta: dict, settings: Settings) -> LiveModel:
    matrix_dir, model_path = published_artifacts(settings, meta)
    params = PipelineParams.from_dict(meta["params"])
    user_ids = pq.read_table(matrix_dir / USERS, columns=["id"])["id"].to_pylist()
    items = pq.read_table(matrix_dir / ITEMS).to_pandas()
    item_ids = items["id"].tolist()
    model = als_model(*load_factors(model_path))
    # the fold-in must solve the same least squares the version was trained with
    model.regularization, model.alpha = params.regularization, params.alpha
    # requests already run in parallel on the pool; implicit's own threads would oversubscribe
    model.num_threads = 1
    _ = model.YtY  # cached on the model: computed once here, not by the first concurrent fold-ins
    active = items["active"].to_numpy(dtype=bool)
    category = items["category"].to_numpy(dtype=object)
    # publish's top-buys order: distinct buyers, then distinct users, then id
    ranked = top_buys_order(items)
    exclude = sp.load_npz(matrix_dir / EXCLUDE).tocsr()
    full = sp.load_npz(matrix_dir / FULL).tocsr()
    return LiveModel(
        version=meta["version"],
        params=params,
        data_start=datetime.fromisoformat(meta["data_start"]),
        model=model,
        user_index={user_id: index for index, user_id in enumerate(user_ids)},
        item_ids=item_ids,
        item_index={item_id: index for index, item_id in enumerate(item_ids)},
        id_types=ids.of_version(meta, user_ids, item_ids),
        active=active,
        category=category,
        categories=frozenset(c for c in category[active] if c is not None),
        popular=ranked.index.to_numpy(dtype=np.int64),
        exclude=exclude,
        document_frequency=np.bincount(full.indices, minlength=full.shape[1]),
    )


# --- ranking on request (CPU work: runs in the thread pool) -------------------------------------


@dataclass(frozen=True)
class UserEvents:
    """A user's recorded interactions as the matrix stage would weigh them."""

    row: sp.csr_matrix  # 1 x items, summed and scaled weights
    owned: np.ndarray  # item indices of exclude_event_types: never recommended again


def _bm25_row(live: LiveModel, row: sp.csr_matrix) -> sp.csr_matrix:
    """BM25 for one user with the window's idf. The user's length norm is taken as average
    (B term 1): the window's raw row sums are not kept, so this approximates the matrix stage."""
    idf = np.log(live.exclude.shape[0]) - np.log1p(live.document_frequency[row.indices])
    scaled = row.copy()
    scaled.data = np.maximum(row.data * (BM25_K1 + 1) / (BM25_K1 + row.data) * idf, BM25_FLOOR).astype(np.float32)
    return scaled


def weigh_events(live: LiveModel, events: list[tuple[str, str, float | None, float]], now: datetime) -> UserEvents:
    """(product_id, event_type, value, epoch seconds) rows -> the user's weighted row.

    The same rules as extract + matrix: unknown products and event types count for nothing, a
    negative, non-finite or absurd (> max_value) value is a data error and is dropped.
    """
    params = live.params
    kept = [
        (live.item_index[product], event_type, math.nan if value is None else value, at)
        for product, event_type, value, at in events
        if product in live.item_index
        and event_type in params.event_weights
        and (value is None or (math.isfinite(value) and 0 <= value <= params.max_value))
    ]
    shape = (1, len(live.item_ids))
    if not kept:
        return UserEvents(sp.csr_matrix(shape, dtype=np.float32), np.empty(0, dtype=np.int64))
    items, types, values, at = (np.asarray(column) for column in zip(*kept, strict=True))
    ages_days = (now.timestamp() - at.astype(np.float64)) / SECONDS_PER_DAY
    weights = interaction_weights(types.astype(str), values.astype(np.float64), ages_days, params.event_weights, params.half_life_days)
    row = sp.csr_matrix((weights, (np.zeros(len(items), dtype=np.int32), items)), shape=shape, dtype=np.float32)
    row.sum_duplicates()
    row.eliminate_zeros()
    if params.confidence_scaling == "bm25":
        row = _bm25_row(live, row)
    else:
        row = scale_confidence(row, params.confidence_scaling)
    owned = np.unique(items[np.isin(types, list(params.exclude_event_types))]).astype(np.int64)
    return UserEvents(row.astype(np.float32), owned)


def fold_in_vector(live: LiveModel, events: UserEvents) -> np.ndarray:
    """The user's factors solved against the live item factors (implicit's recalculate_user)."""
    return np.asarray(live.model.recalculate_user(0, events.row), dtype=np.float32)


def rank_items(
    live: LiveModel, vector: np.ndarray, blocked: Iterable[int], category: str | None, count: int
) -> list[int]:
    """Top ``count`` active items by score, never a blocked one, optionally within a category."""
    allowed = _allowed(live, blocked, category)
    candidates = np.flatnonzero(allowed)
    if len(candidates) == 0:
        return []
    scores = live.model.item_factors[candidates] @ vector
    count = min(count, len(candidates))
    best = np.argpartition(-scores, count - 1)[:count]
    # stable on ties so the order matches between calls
    best = best[np.lexsort((candidates[best], -scores[best]))]
    return candidates[best].tolist()


def rank_popular(live: LiveModel, blocked: Iterable[int], category: str | None, count: int) -> list[int]:
    allowed = _allowed(live, blocked, category)
    return [int(i) for i in live.popular[allowed[live.popular]][:count]]


def _allowed(live: LiveModel, blocked: Iterable[int], category: str | None) -> np.ndarray:
    allowed = live.active.copy()
    blocked = np.fromiter(blocked, dtype=np.int64)
    allowed[blocked] = False
    if category is not None:
        allowed &= live.category == category
    return allowed


def similar_to(live: LiveModel, item: int, count: int) -> list[int]:
    blocked = np.flatnonzero(~live.active).astype(np.int32)
    row = similar_items(live.model, np.asarray([item]), count, blocked)[0]
    return [int(i) for i in row[row >= 0]]


# --- Postgres (blocking: runs in the thread pool) ------------------------------------------------


def fetch_user_events(settings: Settings, user_id: str, since: datetime) -> list[tuple[str, str, float | None, float]]:
    with db.connect(settings) as conn:
        rows = conn.execute(
            db.sql_text(settings, "user_interactions"),
            {"user_id": user_id, "start": since, "limit": FOLD_IN_MAX_EVENTS},
        ).fetchall()
    return [tuple(row) for row in rows]


class Stored(Enum):
    """What ``record_event`` did with an event."""

    NEW = "new"
    REPLAYED = "replayed"  # its event_id was stored before, for the same event: nothing written
    ID_REUSED = "id_reused"  # its event_id names another stored event: nothing written
    UNKNOWN_PRODUCT = "unknown_product"  # not in the catalogue: nothing written


def record_event(settings: Settings, user_id: str, event: EventIn, occurred_at: datetime, event_id: str | None) -> Stored:
    """Insert the event, once per ``event_id``; committed before this returns."""
    product_id = str(event.product_id)
    with db.connect(settings) as conn:
        if conn.execute(db.sql_text(settings, "product_exists"), {"product_id": product_id}).fetchone() is None:
            return Stored.UNKNOWN_PRODUCT
        inserted = conn.execute(
            db.sql_text(settings, "insert_event"),
            {
                "user_id": user_id,
                "product_id": product_id,
                "event_type": event.event_type,
                "value": event.value,
                "occurred_at": occurred_at,
                "event_id": event_id,
            },
        ).fetchone()
        if inserted is not None:
            return Stored.NEW
        stored = conn.execute(db.sql_text(settings, "event_by_id"), {"event_id": event_id}).fetchone()
    return Stored.REPLAYED if tuple(stored) == (user_id, product_id, event.event_type, event.value) else Stored.ID_REUSED


def mark_refresh_pending(settings: Settings, user_id: str) -> None:
    with db.connect(settings) as conn:
        conn.execute(
            db.sql_text(settings, "mark_refresh_pending"), {"user_id": user_id, "requested_at": datetime.now(UTC)}
        )


def fetch_pending_refreshes(settings: Settings, limit: int) -> list[tuple[str, datetime]]:
    with db.connect(settings) as conn:
        return [tuple(row) for row in conn.execute(db.sql_text(settings, "pending_refreshes"), {"limit": limit})]


def clear_pending_refresh(settings: Settings, user_id: str, requested_at: datetime) -> None:
    with db.connect(settings) as conn:
        conn.execute(db.sql_text(settings, "clear_pending_refresh"), {"user_id": user_id, "requested_at": requested_at})


# --- request and response models ----------------------------------------------------------------


class Recommendations(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "user_id": 101,
                    "version": "20261128T030000Z-888fd592bf",
                    "source": "model",
                    "category": None,
                    "offset": 0,
                    "n": 5,
                    "ranked_on_request": False,
                    "recommended_products": [45, 78, 12, 90, 33],
                }
            ]
        }
    )

    user_id: ProductId = Field(description="As the shop stores it: an integer if all ids are integers")
    version: str = Field(description="Live version the list comes from")
    source: Source = Field(
        description="model: the user was in the live model; fold_in: folded in on request from the "
        "user's recorded interactions; popular: top buys (no usable interactions)"
    )
    category: str | None = Field(description="Category filter applied, if any")
    offset: int
    n: int = Field(description="Page size asked for; the list is shorter only if no more products qualify")
    ranked_on_request: bool = Field(
        description="false: a page of the published list; true: ranked from the live factors for this request"
    )
    recommended_products: list[ProductId] = Field(description="Best first")


class SimilarProducts(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"product_id": 45, "version": "20261128T030000Z-888fd592bf", "ranked_on_request": False,
                 "similar_products": [78, 12, 33]}
            ]
        }
    )

    product_id: ProductId
    version: str
    ranked_on_request: bool
    similar_products: list[ProductId] = Field(description="Most similar first (cosine on item factors)")


class TopBuys(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"category": "books", "version": "20261128T030000Z-888fd592bf", "ranked_on_request": False,
                 "top_buys": [45, 78, 12]}
            ]
        }
    )

    category: str | None
    version: str
    ranked_on_request: bool
    top_buys: list[ProductId] = Field(description="Most distinct buyers first; active products only")


class ModelInfo(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "version": "20261128T030000Z-888fd592bf",
                    "data_start": "2026-08-30T03:00:00+00:00",
                    "data_end": "2026-11-28T03:00:00+00:00",
                    "published_at": "2026-11-28T03:12:41.120000+00:00",
                    "metrics": {"model": {"map": 0.081, "k": 10}, "popularity": {"map": 0.043, "k": 10}},
                    "params": {"top_n": 10, "event_weights": {"purchase": 4.0, "view": 1.0}},
                    "counts": {"users": 600, "users_without_recommendations": 0},
                    "fold_in_users": 3,
                }
            ]
        }
    )

    version: str
    data_start: str
    data_end: str
    published_at: str
    metrics: dict[str, Any] = Field(description="Holdout metrics of the model and of the popularity baseline")
    params: dict[str, Any]
    counts: dict[str, Any]
    id_types: dict[str, Any] | None = Field(
        default=None,
        description='How ids are published: {"user": "int" | "str", "product": ..., "source": {...}} '
        "(null for a version published before they were recorded)",
    )
    fold_in_users: int = Field(
        description="Users the API added to the live user_recs hash after the publish (events of users the "
        "version did not know): HLEN(user_recs) == counts.users + fold_in_users"
    )


class Health(BaseModel):
    status: Literal["ok"]
    version: str | None = None


class Problem(BaseModel):
    detail: str = Field(description="What was wrong")


def _iso_8601_text(value: Any) -> Any:
    """Timestamps are ISO 8601 text only: a number is never read as epoch seconds."""
    if not isinstance(value, str):
        raise ValueError("must be ISO 8601 text, e.g. 2026-11-28T10:15:00Z")
    try:
        return datetime.fromisoformat(value.upper())  # RFC 3339 allows a lower-case t and z
    except ValueError:
        raise ValueError(f"{value[:40]!r} is not an ISO 8601 date-time, e.g. 2026-11-28T10:15:00Z") from None


IsoTimestamp = Annotated[datetime, BeforeValidator(_iso_8601_text)]


def _product_id_kind(value: Any) -> str | None:
    if isinstance(value, bool):  # a bool is an int to Python, never a product id
        return None
    return "integer" if isinstance(value, int) else "string" if isinstance(value, str) else None


# an integer or a string, told apart by JSON type: errors name the branch ("body.product_id.string:
# String should match pattern ...") or, for any other type, say plainly what is expected
ProductIdIn = Annotated[
    Annotated[int, Field(ge=-(2**53), le=2**53), Tag("integer")]
    | Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN), Tag("string")],
    Discriminator(
        _product_id_kind, custom_error_type="product_id_type", custom_error_message="Input should be an integer or a string"
    ),
]
EventId = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN)]


class EventIn(BaseModel):
    # strict: JSON types as sent, so true is not product 1 and "3" is not the value 3
    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"product_id": 45, "event_type": "purchase", "value": 2, "timestamp": "2026-11-28T10:15:00Z",
                 "event_id": "order-9321-line-1"}
            ]
        },
    )

    product_id: ProductIdIn
    event_type: str = Field(min_length=1, max_length=64, description="One of the live version's event_weights")
    value: float | None = Field(
        default=None, ge=0, allow_inf_nan=False, description="Quantity or rating; null counts as 1"
    )
    timestamp: IsoTimestamp | None = Field(
        default=None,
        description="When it happened, ISO 8601 (UTC if no offset); default now. At most "
        "RECSYS_MAX_CLOCK_SKEW_SECONDS in the future and not older than the live version's lookback_days",
    )
    event_id: EventId | None = Field(
        default=None,
        description="The client's id of this event (or the Idempotency-Key header): a retried POST is stored once",
    )


class EventAccepted(Recommendations):
    event_stored: Literal[True] = True
    event_id: str | None = Field(description="The event's id, if the client gave one")
    replayed: bool = Field(description="true: this event_id was already stored (a retry); nothing new was written")


class EventPending(BaseModel):
    """The event is stored; the user's list is refreshed once Redis is reachable again."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"user_id": 101, "event_stored": True, "event_id": "order-9321-line-1", "replayed": False,
                 "list_refresh": "pending",
                 "detail": "stored, list refresh pending: Redis is unavailable; the list is refreshed as soon as Redis allows"}
            ]
        }
    )

    user_id: ProductId
    event_stored: Literal[True] = True
    event_id: str | None
    replayed: bool
    list_refresh: Literal["pending"] = "pending"
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "No API key, or an unknown one, in the X-API-Key header"},
    403: {"model": Problem, "description": "The API key's scope does not allow this (writes need a write key)"},
    404: {"model": Problem, "description": "Unknown user, product or category"},
    409: {"model": Problem, "description": "The event_id names another, already stored event"},
    422: {"model": Problem, "description": "Invalid input; the message says which"},
    429: {"model": Problem, "description": "This key's writes are over RECSYS_API_WRITE_RATE a minute; see Retry-After"},
    503: {"model": Problem, "description": "Redis or the database unreachable, or no version live yet"},
}


# --- the service ---------------------------------------------------------------------------------


class NothingLive(Exception):
    """No version has been published under this prefix yet."""


# KEYS: live meta, live user_recs; ARGV: version, user id, entry. The version check and the write
# are one atomic step, so a list computed against a replaced version never lands in the new one
# (a publish switch renames the meta key). A user new to the hash is counted in the meta's
# fold_in_users in the same step: HLEN(user_recs) == counts.users + fold_in_users always.
WRITE_IF_LIVE = """
if redis.call('HGET', KEYS[1], 'version') ~= ARGV[1] then return -1 end
local added = redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
if added == 1 then redis.call('HINCRBY', KEYS[1], 'fold_in_users', 1) end
return added
"""
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)


class RecsysService:
    """Redis client, live-model cache, thread pool and write rate limiter of one API process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = redis_keys.layout(settings)
        self.redis = aioredis.Redis.from_url(
            settings.require_redis_url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2
        )
        self.pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="recsys-rank")
        self.write_limiter = WriteRateLimiter(self.redis, self.keys, settings.api_write_rate)
        self._live: LiveModel | None = None
        # both keys of each script share the {prefix} hash tag, so they also run on Redis Cluster
        self._version_and_field = self.redis.register_script(
            "return {redis.call('HGET', KEYS[1], 'version'), redis.call('HGET', KEYS[2], ARGV[1])}"
        )
        self._write_if_live = self.redis.register_script(WRITE_IF_LIVE)
        self._loading = asyncio.Lock()
        # set while users may wait for a list refresh (at start: a previous process may have left some)
        self.refreshes_due = asyncio.Event()
        self.refreshes_due.set()

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    async def aclose(self) -> None:
        await self.redis.aclose()
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def live_version(self) -> str | None:
        return await self.redis.hget(self.keys.live("meta"), "version")

    async def model_for(self, version: str | None) -> LiveModel:
        """The in-memory model of ``version``, (re)loaded once when a new version went live."""
        if version is None:
            raise NothingLive
        live = self._live
        if live is not None and live.version == version:
            return live
        async with self._loading:
            if self._live is None or self._live.version != version:
                meta = await redis_keys.read_meta(self.redis, self.keys)
                if meta is None:
                    raise NothingLive
                log.info("loading live version %s", meta["version"])
                self._live = await self.run(load_live_model, meta, self.settings)
            return self._live

    async def current(self) -> LiveModel:
        return await self.model_for(await self.live_version())

    async def current_or_last_loaded(self) -> LiveModel:
        """The live model; while Redis is unreachable, the one this process loaded last (an event
        is still validated and stored then). Without either, Redis' error propagates."""
        try:
            return await self.current()
        except REDIS_DOWN:
            if self._live is None:
                raise
            return self._live

    async def version_and_entry(self, slot: tuple[str, str]) -> tuple[str | None, dict | None]:
        """One command: a script runs atomically, so the entry and the version come from the same
        side of a switch (cheaper on the hot path than a MULTI pipeline of two HGETs)."""
        version, raw = await self._version_and_field(keys=[self.keys.live("meta"), slot[0]], args=[slot[1]])
        return version, redis_keys.decode_entry(raw)

    async def write_if_live(self, version: str, user_id: str, entry: dict) -> bool:
        """HSET the user's list only while ``version`` is live (``WRITE_IF_LIVE``)."""
        added = await self._write_if_live(
            keys=[self.keys.live("meta"), self.keys.live("user_recs")],
            args=[version, user_id, json.dumps(entry, separators=(",", ":"))],
        )
        return added != -1


def service(request: Request) -> RecsysService:
    return request.app.state.service


Service = Annotated[RecsysService, Depends(service)]

WriteKey = Annotated[ApiKey, Security(require_scope("write"))]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key", min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN,
        description="Same as the body's event_id: a retried POST with the same key is stored once",
    ),
]
UserId = Annotated[
    str, PathParam(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN, description="The shop's user id")
]
ProductPathId = Annotated[
    str, PathParam(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN, description="The shop's product id")
]
PageSize = Annotated[int, Query(ge=1, le=MAX_N, description=f"How many (1..{MAX_N})")]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Skip this many (paging)")]
Category = Annotated[
    str | None, Query(min_length=1, max_length=MAX_ID_LENGTH, description="Only products of this category")
]
Exclude = Annotated[
    str | None,
    Query(max_length=MAX_EXCLUDE * (MAX_ID_LENGTH + 1), description="Comma-separated product ids never to return"),
]


def _unprocessable(detail: str) -> HTTPException:
    return HTTPException(status_code=422, detail=detail)


def _check_user_id(live: LiveModel, user_id: str) -> None:
    """A user id the shop's id type cannot hold would be an invalid row at the next extract."""
    if not ids.fits(live.id_types.user, user_id):
        raise _unprocessable(f"user id {user_id[:40]!r} is not an integer: this shop's user ids are (GET /model, id_types)")


def _parse_exclude(raw: str | None) -> set[str]:
    if not raw:
        return set()
    ids = {part.strip() for part in raw.split(",") if part.strip()}
    if len(ids) > MAX_EXCLUDE:
        raise _unprocessable(f"exclude lists {len(ids)} product ids; at most {MAX_EXCLUDE} are allowed")
    too_long = [i for i in ids if len(i) > MAX_ID_LENGTH or not i.isprintable()]
    if too_long:
        raise _unprocessable(f"exclude holds an invalid product id {sorted(too_long)[0][:40]!r}: "
                             f"ids are printable and at most {MAX_ID_LENGTH} characters")
    return ids


def _check_category(live: LiveModel, category: str | None) -> None:
    if category is not None and category not in live.categories:
        known = ", ".join(sorted(live.categories)[:20])
        raise HTTPException(status_code=404, detail=f"Unknown category {category!r}; known: {known}")


def _page(
    live: LiveModel, stored: list[ProductId], excluded: set[str], category: str | None, offset: int, n: int
) -> list[ProductId] | None:
    """The page cut from a published list, or None if that list cannot fill it after filtering."""
    kept = [
        product
        for product in stored
        if str(product) not in excluded
        and (category is None or live.category[live.item_index[str(product)]] == category)
    ]
    return kept[offset : offset + n] if len(kept) >= offset + n else None


def _indices(live: LiveModel, products: Iterable[str]) -> list[int]:
    return [live.item_index[p] for p in products if p in live.item_index]


def _outputs(live: LiveModel, indices: list[int], offset: int, n: int) -> list[ProductId]:
    return [live.product_out(i) for i in indices[offset : offset + n]]


async def _rank_for_user(
    svc: RecsysService, live: LiveModel, user_id: str, source: Source, blocked: list[int], category: str | None, count: int
) -> tuple[Source, list[int]]:
    """Rank from factors: the model's own user factors, else a fold-in of the recorded events,
    else popularity. Returns the source actually used."""
    if source == "model" and user_id in live.user_index:
        index = live.user_index[user_id]
        owned = live.exclude[index].indices.tolist()
        vector = live.model.user_factors[index]
        return "model", await svc.run(rank_items, live, vector, blocked + owned, category, count)
    events = await _user_events(svc, live, user_id)
    if events.row.nnz:
        vector = await svc.run(fold_in_vector, live, events)
        owned = events.owned.tolist()
        return "fold_in", await svc.run(rank_items, live, vector, blocked + owned, category, count)
    return "popular", await svc.run(rank_popular, live, blocked, category, count)


async def _user_events(svc: RecsysService, live: LiveModel, user_id: str) -> UserEvents:
    rows = await svc.run(fetch_user_events, svc.settings, user_id, live.data_start)
    return await svc.run(weigh_events, live, rows, datetime.now(UTC))


async def user_recommendations(
    svc: RecsysService, user_id: str, n: int, offset: int, excluded: set[str], category: str | None
) -> Response:
    version, entry = await svc.version_and_entry(redis_keys.user_recs_slot(svc.keys, user_id))
    live = await svc.model_for(version)
    _check_user_id(live, user_id)
    _check_category(live, category)

    def answer(source: Source, products: list[ProductId], ranked: bool) -> Response:
        # built as JSON directly: this is the hot path, and FastAPI validating a response model
        # again costs more than the Redis round trip (the schema stays documented on the route)
        body = {
            "user_id": live.user_id_out(user_id), "version": live.version, "source": source, "category": category,
            "offset": offset, "n": n, "ranked_on_request": ranked, "recommended_products": products,
        }
        return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")

    if entry is not None:
        source: Source = entry.get("source", "model")
        page = _page(live, entry["recommended_products"], excluded, category, offset, n)
        if page is not None:
            return answer(source, page, False)
    elif user_id in live.user_index:
        source = "model"
    else:
        source = "fold_in"
    blocked = _indices(live, excluded)
    try:
        source, ranked = await _rank_for_user(svc, live, user_id, source, blocked, category, offset + n)
    except psycopg.OperationalError:
        if entry is not None or user_id in live.user_index:
            raise
        # a cold-start user still gets a useful list while the shop database is away
        log.warning("database unavailable; user %r gets top buys", user_id, exc_info=True)
        source, ranked = "popular", await svc.run(rank_popular, live, blocked, category, offset + n)
    if source == "popular":
        stored = await redis_keys.read_entry(svc.redis, redis_keys.top_buys_slot(svc.keys, category))
        page = None if stored is None else _page(live, stored["top_buys"], excluded, None, offset, n)
        if page is not None:
            return answer("popular", page, False)
    return answer(source, _outputs(live, ranked, offset, n), True)


@dataclass(frozen=True)
class RefreshedList:
    live: LiveModel
    source: Source
    products: list[int]  # item indices, best first


async def refresh_user_list(svc: RecsysService, user_id: str) -> RefreshedList | None:
    """Fold the user's recorded events into the live factors and write the new top-``top_n`` list
    to the live ``user_recs`` hash. None if a publish switched versions on every attempt."""
    # a publish may switch versions meanwhile: recompute against the new one rather than write
    # a list of the old version into the new one
    for _ in range(WRITE_ATTEMPTS):
        live = await svc.current()
        events = await _user_events(svc, live, user_id)
        top_n = live.params.top_n
        if not events.row.nnz:
            # nothing the live model knows (e.g. a product newer than the model): lists stay
            return RefreshedList(live, "popular", await svc.run(rank_popular, live, [], None, top_n))
        vector = await svc.run(fold_in_vector, live, events)
        products = await svc.run(rank_items, live, vector, events.owned.tolist(), None, top_n)
        entry = {
            "user_id": live.user_id_out(user_id),
            "recommended_products": [live.product_out(i) for i in products],
            "source": "fold_in",
        }
        if await svc.write_if_live(live.version, user_id, entry):
            return RefreshedList(live, "fold_in", products)
    return None


def _event_time(event: EventIn, params: PipelineParams, max_skew: timedelta, now: datetime) -> datetime:
    """When the event happened (UTC if it has no offset): not further in the future than clocks
    drift, and not older than the lookback, which no model would ever train on."""
    occurred_at = now if event.timestamp is None else event.timestamp
    occurred_at = occurred_at if occurred_at.tzinfo else occurred_at.replace(tzinfo=UTC)
    if occurred_at > now + max_skew:
        raise _unprocessable(
            f"timestamp {occurred_at.isoformat()} is in the future: more than {max_skew.total_seconds():g} s "
            f"after the server's clock ({now.isoformat(timespec='seconds')})"
        )
    oldest = now - timedelta(days=params.lookback_days)
    if occurred_at < oldest:
        raise _unprocessable(
            f"timestamp {occurred_at.isoformat()} is older than the live version's lookback of "
            f"{params.lookback_days} days (before {oldest.isoformat(timespec='seconds')})"
        )
    return occurred_at


async def post_event(svc: RecsysService, user_id: str, event: EventIn, event_id: str | None) -> JSONResponse:
    """Store the event in Postgres (committed first), then refresh the user's live list; if
    Redis cannot take the list now, answer 202 and leave the refresh pending."""
    live = await svc.current_or_last_loaded()
    params = live.params
    _check_user_id(live, user_id)
    if event.event_type not in params.event_weights:
        known = ", ".join(sorted(params.event_weights))
        raise _unprocessable(f"event_type {event.event_type!r} is not weighted by the live version; use one of: {known}")
    if event.value is not None and event.value > params.max_value:
        raise _unprocessable(f"value {event.value} is above max_value {params.max_value}: treated as a data error")
    max_skew = timedelta(seconds=svc.settings.max_clock_skew_seconds)
    occurred_at = _event_time(event, params, max_skew, datetime.now(UTC))
    stored = await svc.run(record_event, svc.settings, user_id, event, occurred_at, event_id)
    if stored is Stored.UNKNOWN_PRODUCT:
        raise HTTPException(status_code=404, detail=f"Product {str(event.product_id)!r} is not in the catalogue")
    if stored is Stored.ID_REUSED:
        raise HTTPException(
            status_code=409,
            detail=f"event_id {event_id!r} already names another stored event (other user, product, "
            "event_type or value); give each event its own id",
        )
    replayed = stored is Stored.REPLAYED
    try:
        refreshed = await refresh_user_list(svc, user_id)
        why_pending = "the live version kept changing"
    except REDIS_DOWN as error:
        log.warning("event of user %r stored; list refresh pending: %s", user_id, type(error).__name__)
        refreshed, why_pending = None, "Redis is unavailable"
    except NothingLive:  # unpublished since the event was validated
        refreshed, why_pending = None, "no version is live"
    if refreshed is None:
        await svc.run(mark_refresh_pending, svc.settings, user_id)
        svc.refreshes_due.set()
        pending = EventPending(
            user_id=live.user_id_out(user_id), event_id=event_id, replayed=replayed,
            detail=f"stored, list refresh pending: {why_pending}; the list is refreshed as soon as Redis allows",
        )
        return JSONResponse(pending.model_dump(mode="json"), status_code=202)
    live, n = refreshed.live, refreshed.live.params.top_n
    accepted = EventAccepted(
        user_id=live.user_id_out(user_id), version=live.version, source=refreshed.source, category=None, offset=0,
        n=n, ranked_on_request=True, recommended_products=[live.product_out(i) for i in refreshed.products],
        event_id=event_id, replayed=replayed,
    )
    return JSONResponse(accepted.model_dump(mode="json"), status_code=200 if replayed else 201)


async def refresh_pending_lists(svc: RecsysService) -> bool:
    """Refresh the lists left pending by events stored while Redis was down; True once none is left."""
    while True:
        pending = await svc.run(fetch_pending_refreshes, svc.settings, PENDING_REFRESH_BATCH)
        for user_id, requested_at in pending:
            if await refresh_user_list(svc, user_id) is None:
                return False
            await svc.run(clear_pending_refresh, svc.settings, user_id, requested_at)
        if len(pending) < PENDING_REFRESH_BATCH:
            return True


async def refresh_pending_lists_when_due(svc: RecsysService) -> None:
    """Background task of each API process: while refreshes may be due, try them every
    RECSYS_API_REFRESH_RETRY_SECONDS until none is left."""
    while True:
        await svc.refreshes_due.wait()
        await asyncio.sleep(svc.settings.api_refresh_retry_seconds)
        svc.refreshes_due.clear()  # an event stored from now on sets it again
        try:
            drained = await refresh_pending_lists(svc)
        except psycopg.errors.UndefinedTable:
            log.error("no pending_list_refreshes table: run `recsys init-db` to add it (idempotent)")
            return
        except (*REDIS_DOWN, NothingLive, psycopg.OperationalError) as error:
            log.info("pending list refreshes wait: %s", type(error).__name__)
            drained = False
        except Exception:
            log.exception("pending list refreshes failed; retrying")
            drained = False
        if not drained:
            svc.refreshes_due.set()


def _unavailable(what: str) -> Callable[[Request, Exception], JSONResponse]:
    async def handler(request: Request, error: Exception) -> JSONResponse:
        # the error text may hold a connection URL; the log has it, the client gets the kind only
        log.warning("%s unavailable for %s: %s", what, request.url.path, error)
        return JSONResponse(status_code=503, content={"detail": f"{what} is unavailable; try again later"})

    return handler


async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """One readable sentence per problem, naming the field and the value sent
    (``body.value: Input should be a valid number, got "3"``), the same shape as every other error
    of this API."""
    problems = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"])
        got = "" if problem["type"] == "missing" else f", got {_shown(problem.get('input'))}"
        problems.append(f"{where}: {problem['msg']}{got}")
    return JSONResponse(status_code=422, content={"detail": "; ".join(problems)})


def _shown(value: Any) -> str:
    """A sent value as JSON, cut short: enough to recognise, never a whole body."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


async def _nothing_live(request: Request, error: Exception) -> JSONResponse:
    prefix = request.app.state.service.keys.prefix
    return JSONResponse(status_code=503, content={"detail": f"No version is live under Redis prefix {prefix!r} yet"})


def _event_id(event: EventIn, idempotency_key: str | None) -> str | None:
    if event.event_id is not None and idempotency_key is not None and event.event_id != idempotency_key:
        raise _unprocessable(
            f"body.event_id {event.event_id!r} and the Idempotency-Key header {idempotency_key!r} differ; send one"
        )
    return event.event_id if event.event_id is not None else idempotency_key


def _add_local_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) from the assets of the swagger-ui-bundle-v2 package, not from a CDN:
    the page works offline. No ReDoc: no package ships it."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API docs",
            swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon-32x32.png",
            # no online validator badge: it would send the schema to validator.swagger.io
            swagger_ui_parameters={"validatorUrl": None},
        )


def create_api(settings: Settings) -> FastAPI:
    """The API app; raises ApiKeyConfigError if the configured keys cannot be used."""
    api_keys = load_api_keys(settings)
    svc = RecsysService(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # events need the shop database: without one there is nothing to refresh
        refresher = asyncio.create_task(refresh_pending_lists_when_due(svc)) if settings.database_url else None
        yield
        if refresher is not None:
            refresher.cancel()
            with suppress(asyncio.CancelledError):
                await refresher
        await svc.aclose()

    app = FastAPI(
        title="Recsys recommendations",
        version="1",
        description="Live recommendations, similar products and top buys from the published version in "
        "Redis; cold-start fold-ins and real-time events. Send an API key in the X-API-Key header. "
        "See docs/serving.md and docs/security.md.",
        lifespan=lifespan,
        responses={503: ERRORS[503]},
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = svc
    app.state.api_keys = api_keys
    _add_local_docs(app)
    # GET endpoints need a read (or write) key unless the operator made reads public
    read_access = [] if settings.api_public_reads else [Security(require_scope("read"))]
    read_errors = {} if settings.api_public_reads else {401: ERRORS[401]}
    for error in (RedisConnectionError, RedisTimeoutError):
        app.add_exception_handler(error, _unavailable("Redis"))
    app.add_exception_handler(psycopg.OperationalError, _unavailable("The shop database"))
    app.add_exception_handler(NothingLive, _nothing_live)
    app.add_exception_handler(RequestValidationError, _invalid_request)

    @app.get(
        "/users/{user_id}/recommendations", response_model=Recommendations, dependencies=read_access,
        responses={**read_errors, 404: ERRORS[404], 422: ERRORS[422]},
    )
    async def get_recommendations(
        user_id: UserId, svc: Service, n: PageSize = 10, offset: Offset = 0, exclude: Exclude = None, category: Category = None
    ) -> Response:
        """The user's list; never excluded, already bought or inactive products.

        Known users get the published list (`model`), unknown users a fold-in of their recorded
        interactions (`fold_in`) or top buys (`popular`). A page the published list cannot fill
        after filtering is ranked on request from the live factors.
        """
        return await user_recommendations(svc, user_id, n, offset, _parse_exclude(exclude), category)

    @app.post(
        "/users/{user_id}/events", response_model=EventAccepted, status_code=201,
        responses={
            200: {"model": EventAccepted, "description": "A retry: this event_id was stored before, nothing new is"},
            202: {"model": EventPending, "description": "Stored; the list is refreshed once Redis is back"},
            **{status: ERRORS[status] for status in (401, 403, 404, 409, 422, 429)},
        },
    )
    async def create_event(
        user_id: UserId, event: EventIn, svc: Service, key: WriteKey, idempotency_key: IdempotencyKey = None
    ) -> JSONResponse:
        """Store an interaction in the shop database, then refresh the user's live list.

        Needs a write key. 201: stored and the list refreshed; 200: a retry of a stored
        `event_id` (stored once); 202: stored, but Redis is unavailable, so the list is refreshed
        once it is back. 429 with `Retry-After` past `RECSYS_API_WRITE_RATE` events a minute per key.
        """
        retry_after = await svc.write_limiter.retry_after(key)
        if retry_after is not None:
            raise HTTPException(
                status_code=429,
                detail=f"This API key sent more than {svc.settings.api_write_rate} events this minute; "
                f"retry in {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )
        return await post_event(svc, user_id, event, _event_id(event, idempotency_key))

    @app.get(
        "/products/{product_id}/similar", response_model=SimilarProducts, dependencies=read_access,
        responses={**read_errors, 404: ERRORS[404], 422: ERRORS[422]},
    )
    async def get_similar(product_id: ProductPathId, svc: Service, n: PageSize = 10) -> SimilarProducts:
        """Products most similar to this one (active only); beyond the published list, ranked on request."""
        version, entry = await svc.version_and_entry(redis_keys.similar_slot(svc.keys, product_id))
        live = await svc.model_for(version)
        if product_id not in live.item_index or not live.active[live.item_index[product_id]]:
            raise HTTPException(status_code=404, detail=f"Product {product_id!r} is not an active product of the live version")
        if entry is not None and len(entry["similar_products"]) >= n:
            return SimilarProducts(product_id=live.product_out(live.item_index[product_id]), version=live.version,
                                   ranked_on_request=False, similar_products=entry["similar_products"][:n])
        similar = await svc.run(similar_to, live, live.item_index[product_id], n)
        return SimilarProducts(product_id=live.product_out(live.item_index[product_id]), version=live.version,
                               ranked_on_request=True, similar_products=[live.product_out(i) for i in similar])

    @app.get(
        "/top-buys", response_model=TopBuys, dependencies=read_access,
        responses={**read_errors, 404: ERRORS[404], 422: ERRORS[422]},
    )
    async def get_top_buys(svc: Service, n: PageSize = 10, category: Category = None) -> TopBuys:
        """Most bought active products, overall or within a category."""
        version, entry = await svc.version_and_entry(redis_keys.top_buys_slot(svc.keys, category))
        live = await svc.model_for(version)
        _check_category(live, category)
        if entry is not None and len(entry["top_buys"]) >= n:
            return TopBuys(category=category, version=live.version, ranked_on_request=False, top_buys=entry["top_buys"][:n])
        ranked = await svc.run(rank_popular, live, [], category, n)
        return TopBuys(category=category, version=live.version, ranked_on_request=True, top_buys=_outputs(live, ranked, 0, n))

    @app.get("/model", response_model=ModelInfo, dependencies=read_access, responses=read_errors)
    async def get_model(svc: Service) -> dict:
        """The live version: data window, holdout metrics, params, counts, publish time."""
        meta = await redis_keys.read_meta(svc.redis, svc.keys)
        if meta is None:
            raise NothingLive
        return {**redis_keys.public_meta(meta), redis_keys.FOLD_IN_USERS: int(meta.get(redis_keys.FOLD_IN_USERS, 0))}

    @app.get("/health/live", response_model=Health)
    async def health_live() -> Health:
        """The process answers."""
        return Health(status="ok")

    @app.get("/health/ready", response_model=Health)
    async def health_ready(svc: Service) -> Health:
        """Redis answers and a version is live."""
        version = await svc.live_version()
        if version is None:
            raise NothingLive
        return Health(status="ok", version=version)

    return app


def server_app() -> FastAPI:
    """The app of one ``recsys serve`` worker process (a uvicorn factory: each worker builds its
    own Redis client, live-model cache and thread pool)."""
    from threadpoolctl import threadpool_limits

    # requests are ranked in parallel on a thread pool; a multi-threaded BLAS under each would
    # oversubscribe the cores (process-wide on purpose: this process only serves)
    threadpool_limits(limits=1, user_api="blas")
    return create_api(Settings())


def serve(settings: Settings, host: str, port: int, workers: int, access_log: bool, unavailable: str | None) -> None:
    """Run uvicorn with ``workers`` processes of :func:`server_app`, after checking, once and with
    the operator's message, what every worker would otherwise fail on. ``unavailable``: why
    nothing is live and how to restore it, logged as a warning (the CLI works it out)."""
    import uvicorn

    settings.require_redis_url  # noqa: B018 - raises with the operator's message
    try:
        keys = load_api_keys(settings)
    except ApiKeyConfigError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(code=1) from None
    if not keys.keys and not settings.api_public_reads:
        typer.echo(NO_KEYS_HELP, err=True)
        raise typer.Exit(code=1)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    if unavailable is not None:
        log.warning("%s; until then every request answers 503", unavailable)
    log.info(
        "API keys: %d read, %d write; public reads: %s; writes limited to %d events a minute per key",
        keys.count("read"), keys.count("write"), settings.api_public_reads, settings.api_write_rate,
    )
    if not keys.count("write"):
        log.warning("no write key configured: POST /users/{id}/events is refused (401/403)")
    uvicorn.run(
        "recsys.serving.api:server_app", factory=True, host=host, port=port, workers=workers, access_log=access_log
    )


NO_KEYS_HELP = f"""error: no API key configured, so every request would be refused. Make one with
  {NEW_KEY_COMMAND}
(or `python -c "from recsys.serving.security import new_api_key; print(new_api_key('write'))"`) and start with
  RECSYS_API_KEYS=write:<key> recsys serve
(entries scope:key, comma-separated; scope read or write), or set RECSYS_API_PUBLIC_READS=true for a
read-only API open to anyone. See docs/security.md."""
