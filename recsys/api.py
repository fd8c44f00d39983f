"""Recommendation API: the live version in Redis over HTTP, cold-start fallbacks, real-time events.

Reads go to the live keys only (``store.KeyLayout.live``), so a publish switch is seen at once.
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
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
import psycopg
import pyarrow.parquet as pq
import redis.asyncio as aioredis
import scipy.sparse as sp
import typer
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from recsys import db, store
from recsys.params import PipelineParams
from recsys.pipeline import live_artifacts
from recsys.publish import id_codec
from recsys.ranking import als_model, similar_items
from recsys.settings import Settings
from recsys.train import load_factors
from recsys.weighting import BM25_FLOOR, interaction_weights, scale_confidence

log = logging.getLogger(__name__)

MAX_N = 100
MAX_OFFSET = 1_000
MAX_EXCLUDE = 500
MAX_ID_LENGTH = 128
# printable ids without commas (``exclude`` is a comma-separated list of them)
ID_PATTERN = r"^[^\x00-\x1f\x7f,]+$"
FOLD_IN_MAX_EVENTS = 5_000
# clocks of shop servers drift a little; an event further in the future is a client bug
MAX_CLOCK_SKEW = timedelta(minutes=5)
WRITE_ATTEMPTS = 3
BM25_K1 = 1.2  # scale_confidence's default, the one the matrix stage uses
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
    item_out: Callable[[str], ProductId]
    user_out: Callable[[str], ProductId]
    active: np.ndarray  # bool per item
    category: np.ndarray  # object per item (None if uncategorised)
    categories: frozenset[str]  # categories with an active product: the ones with top buys
    popular: np.ndarray  # active item indices in top-buys order
    exclude: sp.csr_matrix  # who already has what in the window
    document_frequency: np.ndarray  # users per item in the window, for bm25 fold-ins

    def product_out(self, index: int) -> ProductId:
        return self.item_out(self.item_ids[index])

    def user_id_out(self, user_id: str) -> ProductId:
        """The form publish would have given this id; a string-id shop keeps strings for new users."""
        return self.user_out(user_id) if user_id in self.user_index or self.user_out is str else id_codec([user_id])(user_id)


def load_live_model(meta: dict, settings: Settings) -> LiveModel:
    matrix_dir, model_path = live_artifacts(settings, meta)
    params = PipelineParams.from_dict(meta["params"])
    user_ids = pq.read_table(matrix_dir / "users.parquet", columns=["id"])["id"].to_pylist()
    items = pq.read_table(matrix_dir / "items.parquet").to_pandas()
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
    ranked = items[active].sort_values(["buyers", "popularity", "id"], ascending=[False, False, True])
    exclude = sp.load_npz(matrix_dir / "exclude.npz").tocsr()
    full = sp.load_npz(matrix_dir / "full.npz").tocsr()
    return LiveModel(
        version=meta["version"],
        params=params,
        data_start=datetime.fromisoformat(meta["data_start"]),
        model=model,
        user_index={user_id: index for index, user_id in enumerate(user_ids)},
        item_ids=item_ids,
        item_index={item_id: index for index, item_id in enumerate(item_ids)},
        item_out=id_codec(item_ids),
        user_out=id_codec(user_ids),
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


def record_event(settings: Settings, user_id: str, event: EventIn, occurred_at: datetime) -> bool:
    """Insert the event; False (nothing written) if the product is not in the catalogue."""
    product_id = str(event.product_id)
    with db.connect(settings) as conn:
        if conn.execute(db.sql_text(settings, "product_exists"), {"product_id": product_id}).fetchone() is None:
            return False
        conn.execute(
            db.sql_text(settings, "insert_interaction"),
            {
                "user_id": user_id,
                "product_id": product_id,
                "event_type": event.event_type,
                "value": event.value,
                "occurred_at": occurred_at,
            },
        )
    return True


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


class Health(BaseModel):
    status: Literal["ok"]
    version: str | None = None


class Problem(BaseModel):
    detail: str = Field(description="What was wrong")


class EventIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"product_id": 45, "event_type": "purchase", "value": 2, "timestamp": "2026-11-28T10:15:00Z"}]
        },
    )

    product_id: Annotated[int, Field(ge=-(2**53), le=2**53)] | Annotated[
        str, Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN)
    ]
    event_type: str = Field(min_length=1, max_length=64, description="One of the live version's event_weights")
    value: float | None = Field(
        default=None, ge=0, allow_inf_nan=False, description="Quantity or rating; null counts as 1"
    )
    timestamp: datetime | None = Field(default=None, description="When it happened (UTC if no offset); default now")


class EventAccepted(Recommendations):
    event_stored: Literal[True] = True


ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "Unknown user, product or category"},
    422: {"model": Problem, "description": "Invalid input; the message says which"},
    503: {"model": Problem, "description": "Redis or the database unreachable, or no version live yet"},
}


# --- the service ---------------------------------------------------------------------------------


class NothingLive(Exception):
    """No version has been published under this prefix yet."""


class RecsysService:
    """Redis client, live-model cache and thread pool of one API process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = store.layout(settings)
        self.redis = aioredis.Redis.from_url(
            settings.require_redis_url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2
        )
        self.pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="recsys-rank")
        self._live: LiveModel | None = None
        # both keys share the {prefix} hash tag, so the script also runs on Redis Cluster
        self._version_and_field = self.redis.register_script(
            "return {redis.call('HGET', KEYS[1], 'version'), redis.call('HGET', KEYS[2], ARGV[1])}"
        )
        self._loading = asyncio.Lock()

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
                meta = await store.read_meta(self.redis, self.keys)
                if meta is None:
                    raise NothingLive
                log.info("loading live version %s", meta["version"])
                self._live = await self.run(load_live_model, meta, self.settings)
            return self._live

    async def current(self) -> LiveModel:
        return await self.model_for(await self.live_version())

    async def version_and_entry(self, slot: tuple[str, str]) -> tuple[str | None, dict | None]:
        """One command: a script runs atomically, so the entry and the version come from the same
        side of a switch (cheaper on the hot path than a MULTI pipeline of two HGETs)."""
        version, raw = await self._version_and_field(keys=[self.keys.live("meta"), slot[0]], args=[slot[1]])
        return version, store.decode_entry(raw)

    async def write_if_live(self, version: str, user_id: str, entry: dict) -> bool:
        """HSET the user's list only while ``version`` is live: a publish switch renames the meta
        key, so WATCH turns a write that would land in the new version into a no-op."""
        meta_key = self.keys.live("meta")
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(meta_key)
            if await pipe.hget(meta_key, "version") != version:
                return False
            pipe.multi()
            pipe.hset(self.keys.live("user_recs"), user_id, json.dumps(entry, separators=(",", ":")))
            try:
                await pipe.execute()
            except WatchError:
                return False
        return True


def service(request: Request) -> RecsysService:
    return request.app.state.service


Service = Annotated[RecsysService, Depends(service)]

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
    version, entry = await svc.version_and_entry(store.user_recs_slot(svc.keys, user_id))
    live = await svc.model_for(version)
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
        stored = await store.read_entry(svc.redis, store.top_buys_slot(svc.keys, category))
        page = None if stored is None else _page(live, stored["top_buys"], excluded, None, offset, n)
        if page is not None:
            return answer("popular", page, False)
    return answer(source, _outputs(live, ranked, offset, n), True)


async def post_event(svc: RecsysService, user_id: str, event: EventIn) -> EventAccepted:
    live = await svc.current()
    params = live.params
    if event.event_type not in params.event_weights:
        known = ", ".join(sorted(params.event_weights))
        raise _unprocessable(f"event_type {event.event_type!r} is not weighted by the live version; use one of: {known}")
    if event.value is not None and event.value > params.max_value:
        raise _unprocessable(f"value {event.value} is above max_value {params.max_value}: treated as a data error")
    now = datetime.now(UTC)
    occurred_at = now if event.timestamp is None else event.timestamp
    occurred_at = occurred_at if occurred_at.tzinfo else occurred_at.replace(tzinfo=UTC)
    if occurred_at > now + MAX_CLOCK_SKEW:
        raise _unprocessable(f"timestamp {occurred_at.isoformat()} is in the future")
    if not await svc.run(record_event, svc.settings, user_id, event, occurred_at):
        raise HTTPException(status_code=404, detail=f"Product {str(event.product_id)!r} is not in the catalogue")
    # a publish may switch versions meanwhile: recompute against the new one rather than write
    # a list of the old version into the new one
    for _ in range(WRITE_ATTEMPTS):
        live = await svc.current()
        events = await _user_events(svc, live, user_id)
        top_n = live.params.top_n
        if not events.row.nnz:
            # nothing the live model knows (e.g. a product newer than the model): lists stay
            products = await svc.run(rank_popular, live, [], None, top_n)
            return _accepted(live, user_id, "popular", products, top_n)
        vector = await svc.run(fold_in_vector, live, events)
        products = await svc.run(rank_items, live, vector, events.owned.tolist(), None, top_n)
        entry = {
            "user_id": live.user_id_out(user_id),
            "recommended_products": [live.product_out(i) for i in products],
            "source": "fold_in",
        }
        if await svc.write_if_live(live.version, user_id, entry):
            return _accepted(live, user_id, "fold_in", products, top_n)
    raise HTTPException(status_code=503, detail="The live version kept changing; the event is stored, retry to refresh the list")


def _accepted(live: LiveModel, user_id: str, source: Source, products: list[int], n: int) -> EventAccepted:
    return EventAccepted(
        user_id=live.user_id_out(user_id), version=live.version, source=source, category=None, offset=0, n=n,
        ranked_on_request=True, recommended_products=[live.product_out(i) for i in products],
    )


def _unavailable(what: str) -> Callable[[Request, Exception], JSONResponse]:
    async def handler(request: Request, error: Exception) -> JSONResponse:
        # the error text may hold a connection URL; the log has it, the client gets the kind only
        log.warning("%s unavailable for %s: %s", what, request.url.path, error)
        return JSONResponse(status_code=503, content={"detail": f"{what} is unavailable; try again later"})

    return handler


async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """One readable sentence per problem (``query.n: Input should be ...``), the same shape as
    every other error of this API."""
    problems = "; ".join(
        f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}" for problem in error.errors()
    )
    return JSONResponse(status_code=422, content={"detail": problems})


async def _nothing_live(request: Request, error: Exception) -> JSONResponse:
    prefix = request.app.state.service.keys.prefix
    return JSONResponse(status_code=503, content={"detail": f"No version is live under Redis prefix {prefix!r} yet"})


def create_api(settings: Settings) -> FastAPI:
    svc = RecsysService(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await svc.aclose()

    app = FastAPI(
        title="Recsys recommendations",
        version="1",
        description="Live recommendations, similar products and top buys from the published version in "
        "Redis; cold-start fold-ins and real-time events. See docs/serving.md.",
        lifespan=lifespan,
        responses={503: ERRORS[503]},
    )
    app.state.service = svc
    for error in (RedisConnectionError, RedisTimeoutError):
        app.add_exception_handler(error, _unavailable("Redis"))
    app.add_exception_handler(psycopg.OperationalError, _unavailable("The shop database"))
    app.add_exception_handler(NothingLive, _nothing_live)
    app.add_exception_handler(RequestValidationError, _invalid_request)

    @app.get("/users/{user_id}/recommendations", response_model=Recommendations, responses={404: ERRORS[404], 422: ERRORS[422]})
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
        responses={404: ERRORS[404], 422: ERRORS[422]},
    )
    async def create_event(user_id: UserId, event: EventIn, svc: Service) -> EventAccepted:
        """Store an interaction in the shop database and refresh the user's live list at once."""
        return await post_event(svc, user_id, event)

    @app.get("/products/{product_id}/similar", response_model=SimilarProducts, responses={404: ERRORS[404], 422: ERRORS[422]})
    async def get_similar(product_id: ProductPathId, svc: Service, n: PageSize = 10) -> SimilarProducts:
        """Products most similar to this one (active only); beyond the published list, ranked on request."""
        version, entry = await svc.version_and_entry(store.similar_slot(svc.keys, product_id))
        live = await svc.model_for(version)
        if product_id not in live.item_index or not live.active[live.item_index[product_id]]:
            raise HTTPException(status_code=404, detail=f"Product {product_id!r} is not an active product of the live version")
        if entry is not None and len(entry["similar_products"]) >= n:
            return SimilarProducts(product_id=live.product_out(live.item_index[product_id]), version=live.version,
                                   ranked_on_request=False, similar_products=entry["similar_products"][:n])
        similar = await svc.run(similar_to, live, live.item_index[product_id], n)
        return SimilarProducts(product_id=live.product_out(live.item_index[product_id]), version=live.version,
                               ranked_on_request=True, similar_products=[live.product_out(i) for i in similar])

    @app.get("/top-buys", response_model=TopBuys, responses={404: ERRORS[404], 422: ERRORS[422]})
    async def get_top_buys(svc: Service, n: PageSize = 10, category: Category = None) -> TopBuys:
        """Most bought active products, overall or within a category."""
        version, entry = await svc.version_and_entry(store.top_buys_slot(svc.keys, category))
        live = await svc.model_for(version)
        _check_category(live, category)
        if entry is not None and len(entry["top_buys"]) >= n:
            return TopBuys(category=category, version=live.version, ranked_on_request=False, top_buys=entry["top_buys"][:n])
        ranked = await svc.run(rank_popular, live, [], category, n)
        return TopBuys(category=category, version=live.version, ranked_on_request=True, top_buys=_outputs(live, ranked, 0, n))

    @app.get("/model", response_model=ModelInfo)
    async def get_model(svc: Service) -> dict:
        """The live version: data window, holdout metrics, params, counts, publish time."""
        meta = await store.read_meta(svc.redis, svc.keys)
        if meta is None:
            raise NothingLive
        return store.public_meta(meta)

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


def serve_command(
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Processes; about one per core")] = 1,
    access_log: Annotated[bool, typer.Option(help="Log every request (costs throughput)")] = False,
) -> None:
    """Serve the recommendation API (uvicorn) on the live version in Redis."""
    import uvicorn

    Settings().require_redis_url  # noqa: B018 - raises here, with the operator's message, not in every worker
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        "recsys.api:server_app", factory=True, host=host, port=port, workers=workers, access_log=access_log
    )
