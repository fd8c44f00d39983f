"""One API process's service (Redis client, live-model cache, thread pool) and what each route
does with it: a user's list, a posted event and its list refresh, the pending refreshes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import numpy as np
import psycopg
from fastapi import Depends, Header, HTTPException, Query, Request, Security
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse

from recsys.core import ids
from recsys.core.errors import InputError
from recsys.core.interaction_rules import value_problem
from recsys.core.params import PipelineParams
from recsys.core.rules import RuleSnapshot, take_snapshot
from recsys.core.settings import Settings
from recsys.ml.co_purchase import blend_cart
from recsys.ml.merchandising import Merchandising, UserRules, place_pins_in_list, trace
from recsys.serving.events import (
    Stored,
    clear_pending_refresh,
    fetch_pending_refreshes,
    fetch_user_events,
    mark_refresh_pending,
    record_event,
)
from recsys.serving.explanations import explained_products
from recsys.serving.exposures import ExposureLog
from recsys.serving.fold_in import UserEvents, fold_in_vector, rank_items, rank_popular, similar_to, weigh_events
from recsys.serving.live_model import LiveModel, load_live_model
from recsys.serving.schemas import (
    ID_PATTERN,
    MAX_EXCLUDE,
    MAX_ID_LENGTH,
    MAX_N,
    MAX_OFFSET,
    CartIn,
    EventAccepted,
    EventIn,
    EventPending,
    ProductId,
    Source,
)
from recsys.serving.security import (
    ApiKey,
    WriteRateLimiter,
    require_scope,
)
from recsys.storage.connection import UNAVAILABLE
from recsys.storage.keys import top_buys_field
from recsys.storage.live import LiveStore, Pointer

log = logging.getLogger(__name__)

WRITE_ATTEMPTS = 3  # recomputations of a list when versions switch under it
PENDING_REFRESH_BATCH = 100
T = TypeVar("T")



class NothingLive(Exception):
    """No version has been published under this prefix yet."""


# where the rules applied to an answer come from: this process' read of the shop database, the
# live version's publish (the database could not be read since, or not yet), or nowhere
RulesSource = Literal["database", "published", "none"]


class RecsysService:
    """Live store (Redis), live-model cache, thread pool and write rate limiter of one API process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = LiveStore(settings)
        self.pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="recsys-rank")
        self.write_limiter = WriteRateLimiter(self.store, settings.api_write_rate)
        self._live: LiveModel | None = None
        # the lists served to experiment users, on their way to recommendation_exposures (needs the shop database)
        self.exposures = ExposureLog(settings) if settings.database_url else None
        self._loading = asyncio.Lock()
        # the merchandising rules in force, re-read every RECSYS_RULES_REFRESH_SECONDS; None until
        # first read. Whenever it is missing or older, the rules the live version was published
        # with apply instead: never fewer exclusions than the published lists were made with
        self.rule_snapshot: RuleSnapshot | None = None
        # why the last read of the rules failed (None: it succeeded), for /health/ready
        self.rules_read_problem: str | None = "not read yet" if settings.database_url else None
        self._merchandising: tuple[str, RuleSnapshot, Merchandising] | None = None
        self._lists_hold: tuple[str, RuleSnapshot | None, bool] | None = None
        # set while users may wait for a list refresh (at start: a previous process may have left some)
        self.refreshes_due = asyncio.Event()
        self.refreshes_due.set()

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    async def aclose(self) -> None:
        # queued work is dropped; running work (a fold-in, a rules read) ends before the process
        # does, so no database session outlives it
        await asyncio.to_thread(self.pool.shutdown, wait=True, cancel_futures=True)
        await self.store.aclose()

    async def model_for(self, pointer: Pointer | None) -> LiveModel:
        """The in-memory model of the build ``pointer`` names, (re)loaded once when a new build went live."""
        if pointer is None:
            raise NothingLive
        live = self._live
        if live is not None and live.build == pointer.build:
            return live
        async with self._loading:
            if self._live is None or self._live.build != pointer.build:
                meta = await self.store.meta(pointer)
                if meta is None:
                    raise NothingLive
                log.info("loading live version %s (build %s)", meta["version"], pointer.build)
                self._live = await self.run(load_live_model, meta, self.settings)
            return self._live

    def rules_in_force(self, live: LiveModel) -> tuple[RuleSnapshot | None, RulesSource]:
        """The newer of the rules this process read and those the live version was published with."""
        read, published = self.rule_snapshot, live.published_rules
        if published is not None and (read is None or read.taken_at < published.taken_at):
            return published, "published"
        return read, "database" if read is not None else "none"

    def merchandising(self, live: LiveModel) -> Merchandising | None:
        """The rules in force compiled for the live catalogue (once per build and rule read)."""
        snapshot, _ = self.rules_in_force(live)
        cached = self._merchandising
        if snapshot is None:
            return None
        if cached is None or cached[0] != live.build or cached[1] is not snapshot:
            cached = (live.build, snapshot, Merchandising(snapshot, live.item_ids, live.category))
            self._merchandising = cached
        return cached[2]

    def published_lists_hold(self, live: LiveModel) -> bool:
        """Whether the rules in force keep out and order exactly what the live version's publish
        did: then a published list (not a fold-in, which the API wrote under the rules of its time)
        is answered as stored, with no filtering, as filtering would change nothing. Worked out
        once per build and rule read."""
        snapshot, _ = self.rules_in_force(live)
        cached = self._lists_hold
        if cached is None or cached[0] != live.build or cached[1] is not snapshot:
            published = live.published_rules
            if snapshot is None or published is None:
                holds = snapshot is None and published is None
            else:
                holds = snapshot is published or (
                    snapshot.ordering_fingerprint() == live.rules_fingerprint
                    and snapshot.exclusion_fingerprint == published.exclusion_fingerprint
                )
            cached = self._lists_hold = (live.build, snapshot, holds)
        return cached[2]

    def kept_out_for_everyone(self, live: LiveModel) -> UserRules | None:
        """The rules of users in no segment: what product pages (similar, top buys) keep out."""
        merchandising = self.merchandising(live)
        return None if merchandising is None else merchandising.for_segments(frozenset())

    async def current(self) -> LiveModel:
        return await self.model_for(await self.store.pointer())

    async def current_or_last_loaded(self) -> LiveModel:
        """The live model; while Redis is unreachable, the one this process loaded last (an event
        is still validated and stored then). Without either, Redis' error propagates."""
        try:
            return await self.current()
        except UNAVAILABLE:
            if self._live is None:
                raise
            return self._live

    async def top_buys(self, live: LiveModel, category: str | None) -> dict | None:
        """The build's published top buys (overall, or of a category)."""
        return (await self.store.top_buys(live.build)).get(top_buys_field(category))


async def service(request: Request) -> RecsysService:
    # async: FastAPI runs a plain def dependency in its thread pool, a hop on every request
    return request.app.state.service


# An answer as the API sends it: compact JSON, UTF-8 as is (one encoder, whichever path built the
# body; msgspec: several times faster than json.dumps on these small documents)
dumps = msgspec.json.Encoder().encode


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
DiversityLambda = Annotated[
    float | None,
    Query(ge=0, le=1, description="MMR diversity of a list ranked on request (0 = score order); given, the list is "
          "always ranked on request. Absent: the live version's diversity_lambda, with which its lists were published"),
]
Explain = Annotated[
    bool, Query(description="Add, per product, the user's past products that weigh most in its score")
]
Debug = Annotated[
    Literal["rules"] | None,
    Query(description="rules: add which merchandising rules are in force for the user and which product each moved"),
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


def _filtered(
    live: LiveModel, stored: list[ProductId], excluded: set[str], category: str | None, rules: UserRules | None,
) -> list[int]:
    """A stored list's item indices after the request's filters and the rules' exclusions."""
    items = [live.item_index[str(p)] for p in stored if str(p) not in excluded and str(p) in live.item_index]
    return [i for i in items if (category is None or live.category[i] == category) and (rules is None or not rules.blocked[i])]


def _indices(live: LiveModel, products: Iterable[str]) -> list[int]:
    return [live.item_index[p] for p in products if p in live.item_index]


def _outputs(live: LiveModel, indices: list[int], offset: int, n: int) -> list[ProductId]:
    return [live.product_out(i) for i in indices[offset : offset + n]]


@dataclass(frozen=True)
class UserVariant:
    """The experiment variant a user's list is served (and ranked on request) with."""

    experiment: str | None  # None: not enrolled in an experiment (or none runs)
    variant: str | None
    params: PipelineParams  # the live params with the variant's overrides
    own_model: bool  # the variant has a model of its own: its published lists are never re-ranked


def user_variant(live: LiveModel, user_id: str, entry: dict | None) -> UserVariant:
    """What the user's entry names (publish scored it with that variant; an entry without the
    fields: not enrolled); a user without an entry, what the hash assigns now."""
    if entry is not None:
        experiment, variant = entry.get("experiment"), entry.get("variant")
    elif live.experiment is not None and (assigned := live.experiment.assign(user_id, datetime.now(UTC))).enrolled:
        experiment, variant = live.experiment.name, assigned.variant
    else:
        experiment = variant = None
    if variant is None:
        return UserVariant(None, None, live.params, False)
    return UserVariant(experiment, variant, live.variant_params.get(variant, live.params), variant in live.own_model_variants)


def served(svc: RecsysService, user_id: str, experiment: str | None, variant: str | None, products: list) -> str:
    """A new ``recommendation_id`` for a list about to be answered (random, unguessable), its
    exposure recorded when the user is in an experiment (cheap: a buffer append)."""
    recommendation_id = secrets.token_hex(16)
    if variant is not None and svc.exposures is not None:
        svc.exposures.record((recommendation_id, experiment, variant, user_id, time.time(), products))
    return recommendation_id


@dataclass(frozen=True)
class Scoring:
    """What ranking one user's list on request starts from."""

    source: Source
    vector: np.ndarray | None  # None: popularity (no factors for the user)
    owned: list[int]  # items the user already has: never listed, never pinned


async def _scoring(svc: RecsysService, live: LiveModel, user_id: str, source: Source) -> Scoring:
    """The model's own user factors, else a fold-in of the recorded events, else popularity."""
    if source == "model" and user_id in live.user_index:
        index = live.user_index[user_id]
        return Scoring("model", live.user_vector(index), live.exclude[index].indices.tolist())
    events = await _user_events(svc, live, user_id)
    if events.row.nnz and (vector := await svc.run(fold_in_vector, live, events)) is not None:
        return Scoring("fold_in", vector, events.owned.tolist())
    # nothing to fold in (or a family that cannot), but what the user said no to (or bought) stays
    # out of the top buys too
    return Scoring("popular", None, events.owned.tolist())


async def _ranked(
    svc: RecsysService, live: LiveModel, scoring: Scoring, blocked: list[int], category: str | None, count: int,
    diversity_lambda: float, head: list[int], rules: UserRules | None, top_n: int,
) -> list[int]:
    """The user's first ``count`` items ranked on request, with the rules (if given) applied:
    excluded items blocked, scores multiplied by boosts and buries, pins placed last. Popularity
    (top buys) is never re-ranked by diversity nor by boosts. ``head``: the published list after
    filtering, which a diverse list continues; ``top_n``: how long the user's published lists are
    (their variant's)."""
    pins = () if rules is None else rules.pins_for(category)
    kept_out = blocked if rules is None else [*blocked, *rules.blocked_items.tolist()]
    wanted = count + len(pins)  # a pin may push one out
    if scoring.vector is None:
        ranked = await svc.run(rank_popular, live, kept_out + scoring.owned, category, wanted)
    else:
        factors = None if rules is None else rules.factors
        ranked = await svc.run(
            rank_items, live, scoring.vector, kept_out + scoring.owned, category, wanted, diversity_lambda, head, factors,
            top_n,
        )
    return place_pins_in_list(ranked, pins, count, unavailable=[*blocked, *scoring.owned])


async def _explanations(
    svc: RecsysService, live: LiveModel, user_id: str, source: Source, products: list[ProductId]
) -> list[dict]:
    """Per product, the user's past products that weigh most in its score: from the row the model
    was fitted on (``model``) or the recorded events a fold-in solves from (``fold_in``); top buys
    have no score to decompose."""
    if source == "model" and user_id in live.user_index:
        row = live.confidence[live.user_index[user_id]]
    elif source == "fold_in":
        row = (await _user_events(svc, live, user_id)).row
    else:
        return []
    return await svc.run(explained_products, live, row, products)


async def _user_events(svc: RecsysService, live: LiveModel, user_id: str) -> UserEvents:
    rows = await svc.run(fetch_user_events, svc.settings, user_id, live.data_start, live.params.negative_event_types)
    return await svc.run(weigh_events, live, rows, datetime.now(UTC))


async def _rules_trace(
    svc: RecsysService, live: LiveModel, user_id: str, merchandising: Merchandising | None, rules: UserRules | None,
    scoring: Scoring, blocked: list[int], category: str | None, diversity_lambda: float, answered: list[int],
    ranked_on_request: bool, top_n: int,
) -> dict:
    """``debug=rules``: the rules in force for this user, where they come from and, per product a
    rule touched, its rank in the list ranked without rules and in the answered one."""
    snapshot, source = svc.rules_in_force(live)
    read = {
        "rules_read": svc.settings.database_url is not None and svc.rules_read_problem is None,
        "rules_source": source,
        "rules_taken_at": None if snapshot is None else snapshot.taken_at.isoformat(),
        "published_with": live.rules_fingerprint,
    }
    if merchandising is None or rules is None:
        return {**read, "in_force": [], "applied": []}
    published = None
    if not ranked_on_request and live.published_rules is not None:
        at_publish = Merchandising(live.published_rules, live.item_ids, live.category)
        published = (at_publish, at_publish.for_user(user_id))
    before = await _ranked(svc, live, scoring, blocked, category, len(answered), diversity_lambda, [], None, top_n)
    applied = trace(merchandising, rules, before, answered, category, published)
    return {
        **read,
        "in_force_fingerprint": merchandising.fingerprint,
        "segments": sorted(merchandising.segments_of(user_id)),
        "in_force": [{"rule_id": rule.rule_id, "rule": rule.describe()} for rule in rules.rules],
        "applied": [
            {**{k: v for k, v in entry.items() if k != "item"}, "product_id": live.product_out(entry["item"])}
            for entry in applied
        ],
    }


async def user_recommendations(
    svc: RecsysService, user_id: str, n: int, offset: int, excluded: set[str], category: str | None,
    diversity_lambda: float | None = None, explain: bool = False, debug_rules: bool = False,
) -> bytes:
    """The answer of ``GET /users/{id}/recommendations`` (``UserRecommendations``), as JSON bytes."""
    pointer, entry, negatives = await svc.store.user_entry(user_id)
    excluded = excluded | negatives  # negative feedback no published version may hold yet
    live = await svc.model_for(pointer)
    _check_user_id(live, user_id)
    if (
        entry is not None and not excluded and offset == 0 and category is None and diversity_lambda is None
        and not explain and not debug_rules and entry.get("source", "model") == "model"
        and len(entry["recommended_products"]) >= n and svc.published_lists_hold(live)
    ):
        # the common case, answered as the general path below would, without its per-product work
        products = entry["recommended_products"][:n]
        experiment, variant = entry.get("experiment"), entry.get("variant")
        return dumps({
            "user_id": live.user_id_out(user_id), "version": live.version, "source": "model", "category": None,
            "offset": 0, "n": n, "ranked_on_request": False, "recommended_products": products,
            "recommendation_id": served(svc, user_id, experiment, variant, products),
            "experiment": experiment, "variant": variant,
        })
    _check_category(live, category)
    chosen = user_variant(live, user_id, entry)
    params = chosen.params
    merchandising = svc.merchandising(live)
    rules = None if merchandising is None else merchandising.for_user(user_id)
    count = offset + n

    async def answer(source: Source, listed: list[int], ranked: bool, scoring: Scoring | None = None) -> bytes:
        # built as JSON directly: this is the hot path, and FastAPI validating a response model
        # again costs more than the Redis round trip (the schema stays documented on the route)
        products = _outputs(live, listed, offset, n)
        extra = {}
        if explain:
            extra["explanations"] = await _explanations(svc, live, user_id, source, products)
        if debug_rules:
            scoring = scoring or await _scoring(svc, live, user_id, source)
            extra["rules"] = await _rules_trace(
                svc, live, user_id, merchandising, rules, scoring, _indices(live, excluded), category,
                params.diversity_lambda if diversity_lambda is None else diversity_lambda, listed[:count], ranked,
                params.top_n,
            )
        # the id last: an exposure is recorded only for a list that is answered
        return dumps({
            "user_id": live.user_id_out(user_id), "version": live.version, "source": source, "category": category,
            "offset": offset, "n": n, "ranked_on_request": ranked, "recommended_products": products,
            "recommendation_id": served(svc, user_id, chosen.experiment, chosen.variant, products),
            "experiment": chosen.experiment, "variant": chosen.variant, **extra,
        })

    # a published list is right under the rules in force if they order as the ones it was made
    # with: then only exclusions (new rules, products gone inactive) are filtered out when read
    same_order = merchandising is None or merchandising.fingerprint == live.rules_fingerprint
    category_pins = rules is not None and category is not None and bool(rules.pins_for(category))
    # a variant with a model of its own: the API cannot rank with that model, so its published
    # lists are only ever filtered, whatever the page (a shorter page rather than another model's)
    as_stored = entry is not None and chosen.own_model and entry.get("source", "model") == "model"
    head: list[int] = []
    if entry is not None and (as_stored or (same_order and not category_pins)):
        kept = _filtered(live, entry["recommended_products"], excluded, category, rules)
        if rules is not None:
            # a pin keeps its rank when products before it were filtered out
            kept = place_pins_in_list(kept, [p for p in rules.pins_for(category) if p.item in kept], len(kept))
        if as_stored or (diversity_lambda is None and len(kept) >= count):
            return await answer(entry.get("source", "model"), kept, False)
        # a deeper page continues the published list rather than re-ranking what it showed
        head = kept if diversity_lambda is None else []
    if entry is not None:
        source: Source = entry.get("source", "model")
    else:
        source = "model" if user_id in live.user_index else "fold_in"
    if diversity_lambda is None:
        diversity_lambda = params.diversity_lambda
    blocked = _indices(live, excluded)
    try:
        scoring = await _scoring(svc, live, user_id, source)
    except psycopg.OperationalError:
        if entry is not None or user_id in live.user_index:
            raise
        # a cold-start user still gets a useful list while the shop database is away
        log.warning("database unavailable; user %r gets top buys", user_id, exc_info=True)
        scoring = Scoring("popular", None, [])
    if scoring.source == "popular":
        stored = await svc.top_buys(live, category)
        if stored is not None:
            pins = () if rules is None else rules.pins_for(category)
            owned = set(scoring.owned)  # e.g. negative feedback whose Redis set has expired
            kept = [i for i in _filtered(live, stored["top_buys"], excluded, None, rules) if i not in owned]
            kept = place_pins_in_list(kept, pins, len(kept) + len(pins), unavailable=[*blocked, *owned])
            if len(kept) >= count:
                return await answer("popular", kept, False, scoring)
    ranked = await _ranked(svc, live, scoring, blocked, category, count, diversity_lambda, head, rules, params.top_n)
    return await answer(scoring.source, ranked, True, scoring)


def _check_cart_ids(live: LiveModel, cart_ids: list[str]) -> None:
    """A product id the shop's id type cannot hold is refused, as an event's would be."""
    for product in cart_ids:
        if not ids.fits(live.id_types.product, product):
            raise _unprocessable(
                f"body.product_ids: {product[:40]!r} is not an integer: this shop's product ids are (GET /model, id_types)"
            )


async def similar_products(svc: RecsysService, product_id: str, n: int) -> bytes:
    """The answer of ``GET /products/{id}/similar`` (``SimilarProducts``), as JSON bytes: the
    published list of the product (active, not excluded by a rule), beyond it ranked on request."""
    pointer, entry = await svc.store.entry("similar_products", product_id)
    live = await svc.model_for(pointer)
    kept_out = svc.kept_out_for_everyone(live)
    if product_id not in live.item_index and entry is not None:
        # a new product (no interaction in the window): publish listed its neighbours by content,
        # which the API cannot rank again; the products the rules now keep out are left out
        blocked = set() if kept_out is None or svc.published_lists_hold(live) else {
            live.item_ids[i] for i in np.flatnonzero(kept_out.blocked)
        }
        kept = [p for p in entry["similar_products"] if str(p) not in blocked]
        return dumps({"product_id": entry["product_id"], "version": live.version, "ranked_on_request": False,
                      "similar_products": kept[:n]})
    if product_id not in live.item_index or not live.active[live.item_index[product_id]]:
        raise HTTPException(status_code=404, detail=f"Product {product_id!r} is not an active product of the live version")
    body = {"product_id": live.product_out(live.item_index[product_id]), "version": live.version}
    if entry is not None and len(entry["similar_products"]) >= n and svc.published_lists_hold(live):
        # published under the exclusions in force: filtering would change nothing
        return dumps({**body, "ranked_on_request": False, "similar_products": entry["similar_products"][:n]})
    if entry is not None:
        kept = _filtered(live, entry["similar_products"], set(), None, kept_out)
        if len(kept) >= n:
            return dumps({**body, "ranked_on_request": False, "similar_products": _outputs(live, kept, 0, n)})
    blocked = None if kept_out is None else kept_out.blocked
    similar = await svc.run(similar_to, live, live.item_index[product_id], n, blocked)
    return dumps({**body, "ranked_on_request": True, "similar_products": [live.product_out(i) for i in similar]})


async def cart_answer(svc: RecsysService, cart: CartIn) -> bytes:
    """The answer of ``POST /carts/recommendations`` (``CartRecommendations``), as JSON bytes."""
    return dumps(await cart_recommendations(svc, cart))


async def cart_recommendations(svc: RecsysService, cart: CartIn) -> dict:
    """Complements of the cart as a whole: the cart products' published bought_together lists and
    their similar products merged in one reciprocal-rank vote (``blend_cart``: on MovieLens-100k
    this beats either list alone, docs/quality.md#cart-bought-together), then, while fewer than ``n``, top buys.
    Never a product of the cart, an inactive one, nor one an exclude rule without a segment keeps
    out (as on product pages). Every list comes from the one build the request resolved (one
    pipeline: an HMGET per bucket)."""
    cart_ids = list(dict.fromkeys(str(product) for product in cart.product_ids))  # first occurrence of each
    live = await svc.current()
    lists = await svc.store.entries(live.build, live.buckets, ("bought_together", "similar_products"), cart_ids)
    together, similar = lists["bought_together"], lists["similar_products"]
    _check_cart_ids(live, cart_ids)
    kept_out = svc.kept_out_for_everyone(live)
    # the lists hold ids as published (the live type): the vote runs on them as they are
    id_out = ids.id_out(live.id_types.product)
    # published under the exclusions in force, the lists need no filtering
    unfiltered = svc.published_lists_hold(live)

    def usable(product: ProductId) -> bool:
        index = live.item_index.get(str(product))
        return index is not None and bool(live.active[index]) and (kept_out is None or not kept_out.blocked[index])

    def lists_of(entries: list[dict | None], field: str) -> list[list[ProductId]]:
        if unfiltered:
            return [entry[field] for entry in entries if entry is not None]
        return [[p for p in entry[field] if usable(p)] for entry in entries if entry is not None]

    known = [product for product in cart_ids if product in live.item_index]
    known_out = [id_out(p) for p in known]
    picked, used = blend_cart(lists_of(together, "bought_together"), lists_of(similar, "similar_products"), cart.n, known_out)
    sources = list(used)
    if len(picked) < cart.n:
        blocked = [live.item_index[p] for p in (*known, *map(str, picked))]
        if kept_out is not None:
            blocked += kept_out.blocked_items.tolist()
        # inline, not in the thread pool: a few array operations over the catalogue; the hand-off
        # to a thread and back cost ~100-180 us of CPU per request more (in process, the bench's demo)
        popular = rank_popular(live, blocked, None, cart.n - len(picked))
        if popular:
            picked += [live.product_out(i) for i in popular]
            sources.append("popular")
    # the schema is CartRecommendations (documented on the route); built as a dict on this hot path
    return {
        "version": live.version,
        "n": cart.n,
        "product_ids": known_out,
        "unknown_product_ids": [id_out(p) for p in cart_ids if p not in live.item_index],
        "source": sources[0] if sources else "popular",
        "sources": sources,
        "recommended_products": picked,
    }


@dataclass(frozen=True)
class RefreshedList:
    live: LiveModel
    source: Source
    products: list[int]  # item indices, best first
    top_n: int  # the user's variant's


async def refresh_user_list(svc: RecsysService, user_id: str) -> RefreshedList | None:
    """Fold the user's recorded events into the live factors and write the new top-``top_n`` list
    to the live ``user_recs`` hash, ranked with the user's variant's params and naming it as the
    entry it replaces did. None if a publish switched versions on every attempt. A published list
    of a variant with a model of its own stays (filtered: the API cannot fold into that model)."""
    # a publish may switch versions meanwhile: recompute against the new one rather than write
    # a list of the old version into the new one
    for _ in range(WRITE_ATTEMPTS):
        live = await svc.current()
        events = await _user_events(svc, live, user_id)
        if events.negative_products:
            # first: every list served filters them from now on, whichever version is live
            await svc.store.remember_negatives(
                user_id, list(events.negative_products), svc.settings.negative_feedback_ttl_seconds
            )
        stored = (await svc.store.entries(live.build, live.buckets, ("user_recs",), [user_id]))["user_recs"][0]
        chosen = user_variant(live, user_id, stored)
        top_n = chosen.params.top_n
        merchandising = svc.merchandising(live)
        rules = None if merchandising is None else merchandising.for_user(user_id)
        if stored is not None and chosen.own_model and stored.get("source", "model") == "model":
            owned = set(events.owned.tolist())
            kept = _filtered(live, stored["recommended_products"], set(events.negative_products), None, rules)
            return RefreshedList(live, "model", [i for i in kept if i not in owned], top_n)
        vector = await svc.run(fold_in_vector, live, events) if events.row.nnz else None
        if vector is None:
            # nothing the live model knows (e.g. a product newer than the model), or a family that
            # cannot fold in a user (BPR): lists stay
            scoring = Scoring("popular", None, events.owned.tolist())
            popular = await _ranked(svc, live, scoring, [], None, top_n, 0.0, [], rules, top_n)
            return RefreshedList(live, "popular", popular, top_n)
        scoring = Scoring("fold_in", vector, events.owned.tolist())
        products = await _ranked(svc, live, scoring, [], None, top_n, chosen.params.diversity_lambda, [], rules, top_n)
        entry = {
            "user_id": live.user_id_out(user_id),
            "recommended_products": [live.product_out(i) for i in products],
            "source": "fold_in",
        }
        if chosen.variant is not None:
            entry |= {"experiment": chosen.experiment, "variant": chosen.variant}
        # into the build it was computed against; done if that build is still the live one
        if await svc.store.write_fold_in(live.build, live.buckets, user_id, entry):
            latest = await svc.store.pointer(fresh=True)
            if latest is not None and latest.build == live.build:
                return RefreshedList(live, "fold_in", products, top_n)
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
    if event.event_type not in params.event_weights and event.event_type not in params.negative_event_types:
        known = ", ".join(sorted({*params.event_weights, *params.negative_event_types}))
        raise _unprocessable(
            f"event_type {event.event_type!r} is neither weighted nor negative feedback in the live version; "
            f"use one of: {known}"
        )
    problem = value_problem(event.event_type, event.value, params.max_value)
    if problem is not None:
        raise _unprocessable(f"body.value {event.value:g} of a {event.event_type!r} event: {problem} (the extract drops such rows)")
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
    except UNAVAILABLE as error:
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
    live, n = refreshed.live, refreshed.top_n
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
        except (*UNAVAILABLE, NothingLive, psycopg.OperationalError) as error:
            log.info("pending list refreshes wait: %s", type(error).__name__)
            drained = False
        except Exception:
            log.exception("pending list refreshes failed; retrying")
            drained = False
        if not drained:
            svc.refreshes_due.set()


FALLBACK = "applying the newer of the last rules read and those the live version was published with"


async def refresh_rules_periodically(svc: RecsysService) -> None:
    """Background task of each API process: re-read the rules in force, the inactive products and
    the segments every RECSYS_RULES_REFRESH_SECONDS. While they cannot be read, answers apply the
    newer of the last read and the live version's published rules (``rules_in_force``), and
    /health/ready says degraded."""
    reported: str | None = None
    while True:
        try:
            svc.rule_snapshot = await svc.run(take_snapshot, svc.settings)
            if svc.rules_read_problem is not None and reported is not None:
                log.warning("merchandising rules read again from the shop database")
            svc.rules_read_problem, reported = None, None
        except Exception as error:  # noqa: BLE001 - every failure keeps the fallback; how it is told differs
            if isinstance(error, InputError):  # e.g. no rules table yet: the operator's message
                problem = str(error)
            elif isinstance(error, psycopg.OperationalError):
                problem = f"the shop database is unavailable ({type(error).__name__})"
            else:
                problem = f"{type(error).__name__} (see the log)"
                log.exception("merchandising rules not read")
            svc.rules_read_problem = problem
            if reported != problem:  # once per kind of failure, not every refresh
                log.warning("merchandising rules not read: %s; %s", problem, FALLBACK)
                reported = problem
        await asyncio.sleep(svc.settings.rules_refresh_seconds)
