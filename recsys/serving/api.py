"""Recommendation API: the routes, their error handlers and the server (``recsys serve``).

Reads go to the live build the live pointer names (``recsys.storage.live``: the pointer is
cached for at most a second, and a build's keys never change), so a publish switch is seen within
a second, and an answer is always one whole version. The hot path is one Redis round trip: one
Lua call on the user's bucket returns the user's list and their negative feedback. The build also
tells whether the in-process copy of the live model (``live_model``) is still current; a new one
is loaded once, off the event loop.

Lists come from the published ones while they can fill the requested page after filtering
(request excludes, category); deeper pages and cold-start users are ranked on request from the
live factors (``fold_in``), in a thread pool so a fold-in never blocks other requests. Events go
to the shop database first (``events``), then refresh the user's list.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime
from typing import Any

import psycopg
import typer
from fastapi import FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from swagger_ui_bundle import swagger_ui_path

from recsys.core.settings import Settings
from recsys.serving.fold_in import rank_popular
from recsys.serving.hot_path import HotPaths
from recsys.serving.schemas import (
    ERRORS,
    CartIn,
    CartRecommendations,
    EventAccepted,
    EventIn,
    EventPending,
    Health,
    ModelInfo,
    SimilarProducts,
    TopBuys,
    UserRecommendations,
    UserVariantInfo,
)
from recsys.serving.security import (
    NEW_KEY_COMMAND,
    ApiKeyConfigError,
    load_api_keys,
    require_scope,
)
from recsys.serving.service import (
    Category,
    Debug,
    DiversityLambda,
    Exclude,
    Explain,
    IdempotencyKey,
    NothingLive,
    Offset,
    PageSize,
    ProductPathId,
    RecsysService,
    Service,
    UserId,
    WriteKey,
    _check_category,
    _check_user_id,
    _filtered,
    _outputs,
    _parse_exclude,
    _unprocessable,
    cart_answer,
    post_event,
    refresh_pending_lists_when_due,
    refresh_rules_periodically,
    similar_products,
    user_recommendations,
)
from recsys.storage.connection import UNAVAILABLE
from recsys.storage.reads import public_meta

log = logging.getLogger(__name__)

DOCS_ASSETS = "/docs-assets"
JSON = "application/json"  # Swagger UI's files, served from the swagger-ui-bundle package

def _unavailable(what: str) -> Callable[[Request, Exception], JSONResponse]:
    async def handler(request: Request, error: Exception) -> JSONResponse:
        # the error text may hold a connection URL; the log has it, the client gets the kind only
        log.warning("%s unavailable for %s: %s", what, request.url.path, error)
        return JSONResponse(status_code=503, content={"detail": f"{what} is unavailable; try again later"})

    return handler


class BodySizeLimit:
    """Refuses a request body over ``max_bytes`` with 413 before anything reads or parses it: by its
    Content-Length at once, else (chunked) as soon as the bytes received pass the limit. A worker
    never spends its time on a body it would refuse."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send)
        received, started, refused = 0, False, False

        async def limited_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            received += len(message.get("body", b""))
            if received <= self.max_bytes:
                return message
            if not started and not refused:
                refused = True
                await self._refuse(send)
            # to the app the client is gone: it stops reading, and what it would answer is dropped
            return {"type": "http.disconnect"}

        async def send_unless_refused(message: Message) -> None:
            nonlocal started
            if not refused:
                started = True
                await send(message)

        await self.app(scope, limited_receive, send_unless_refused)

    async def _refuse(self, send: Send) -> None:
        detail = f"The request body is larger than {self.max_bytes} bytes (RECSYS_API_MAX_BODY_BYTES)"
        await JSONResponse(status_code=413, content={"detail": detail})({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


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
    prefix = request.app.state.service.store.keys.prefix
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


def create_api(settings: Settings, freeze_heap: bool = False) -> HotPaths:
    """The API app (FastAPI, behind the hot paths that answer its three busiest requests); raises
    ApiKeyConfigError if the configured keys cannot be used. ``freeze_heap``: a server process's
    (see :func:`_freeze_heap`)."""
    api_keys = load_api_keys(settings)
    svc = RecsysService(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # a cluster client learns the slot map once, before the first burst of requests
        with suppress(*UNAVAILABLE):
            await svc.store.pointer(fresh=True)
        if freeze_heap:
            with suppress(*UNAVAILABLE, NothingLive):
                await svc.current()  # the live model's objects too
            _freeze_heap()
        # events need the shop database: without one there is nothing to refresh
        background = (
            [asyncio.create_task(refresh_pending_lists_when_due(svc)), asyncio.create_task(refresh_rules_periodically(svc))]
            if settings.database_url else []
        )
        exposures = None if svc.exposures is None else asyncio.create_task(svc.exposures.flush_periodically())
        yield
        for task in background:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        if exposures is not None:
            svc.exposures.stop()  # its last flush writes what this process served since the one before
            await exposures
        await svc.aclose()

    app = FastAPI(
        title="Recsys recommendations",
        version="1",
        description="Live recommendations, similar products, cart complements and top buys from the published version in "
        "Redis; cold-start fold-ins and real-time events. Send an API key in the X-API-Key header. "
        "See docs/serving.md and docs/security.md.",
        lifespan=lifespan,
        responses={503: ERRORS[503]},
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = svc
    app.state.api_keys = api_keys
    app.add_middleware(BodySizeLimit, max_bytes=settings.api_max_body_bytes)
    _add_local_docs(app)
    # GET endpoints need a read (or write) key unless the operator made reads public
    read_access = [] if settings.api_public_reads else [Security(require_scope("read"))]
    read_errors = {} if settings.api_public_reads else {401: ERRORS[401]}
    for error in UNAVAILABLE:
        app.add_exception_handler(error, _unavailable("Redis"))
    app.add_exception_handler(psycopg.OperationalError, _unavailable("The shop database"))
    app.add_exception_handler(NothingLive, _nothing_live)
    app.add_exception_handler(RequestValidationError, _invalid_request)

    @app.get(
        "/users/{user_id}/recommendations", response_model=UserRecommendations, dependencies=read_access,
        responses={**read_errors, 404: ERRORS[404], 422: ERRORS[422]},
    )
    async def get_recommendations(
        user_id: UserId, svc: Service, n: PageSize = 10, offset: Offset = 0, exclude: Exclude = None,
        category: Category = None, diversity_lambda: DiversityLambda = None, explain: Explain = False,
        debug: Debug = None,
    ) -> Response:
        """The user's list; never excluded, already bought, disliked (negative feedback) or inactive products.

        Known users get the published list (`model`), unknown users a fold-in of their recorded
        interactions (`fold_in`) or top buys (`popular`). A page the published list cannot fill
        after filtering, or any page asked with `diversity_lambda`, is ranked on request from the
        live factors. `explain=true` adds, per product, the past products that weigh most in its score.
        Merchandising rules in force (`recsys rules`) apply within RECSYS_RULES_REFRESH_SECONDS of
        a change; `debug=rules` adds which rule moved which product.
        """
        body = await user_recommendations(
            svc, user_id, n, offset, _parse_exclude(exclude), category, diversity_lambda, explain, debug == "rules"
        )
        return Response(body, media_type=JSON)

    @app.get(
        "/users/{user_id}/variant", response_model=UserVariantInfo, dependencies=read_access,
        responses={**read_errors, 422: ERRORS[422]},
    )
    async def get_variant(user_id: UserId, svc: Service) -> dict:
        """The user's variant of the experiment the live version serves (docs/experiments.md): the
        salted hash of (experiment, user id) publish assigned with, at the time asked. Not enrolled:
        the control's lists, not counted in the analysis. Without an experiment, nulls."""
        live = await svc.current()
        _check_user_id(live, user_id)
        if live.experiment is None:
            return {"user_id": live.user_id_out(user_id), "experiment": None, "variant": None, "enrolled": False}
        assigned = live.experiment.assign(user_id, datetime.now(UTC))
        return {"user_id": live.user_id_out(user_id), "experiment": live.experiment.name, "variant": assigned.variant,
                "enrolled": assigned.enrolled}

    @app.post(
        "/users/{user_id}/events", response_model=EventAccepted, status_code=201,
        responses={
            200: {"model": EventAccepted, "description": "A retry: this event_id was stored before, nothing new is"},
            202: {"model": EventPending, "description": "Stored; the list is refreshed once Redis is back"},
            **{status: ERRORS[status] for status in (401, 403, 404, 409, 413, 422, 429)},
        },
    )
    async def create_event(
        user_id: UserId, event: EventIn, svc: Service, key: WriteKey, idempotency_key: IdempotencyKey = None
    ) -> JSONResponse:
        """Store an interaction in the shop database, then refresh the user's live list.

        Negative feedback (`dislike`, `return`, `not_interested` by default) removes the product from
        every list served to this user, at once and across new versions.

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
    async def get_similar(product_id: ProductPathId, svc: Service, n: PageSize = 10) -> Response:
        """Products most similar to this one (active, not excluded by a rule); beyond the published
        list, ranked on request."""
        return Response(await similar_products(svc, product_id, n), media_type=JSON)

    @app.post(
        "/carts/recommendations", response_model=CartRecommendations, dependencies=read_access,
        responses={**read_errors, 413: ERRORS[413], 422: ERRORS[422]},
    )
    async def post_cart(cart: CartIn, svc: Service) -> Response:
        """Products that complement a cart as a whole (read-only: a read key, like the GET routes).

        The cart products' published bought-together lists (co-purchases beyond chance, filled with
        similar products for rarely bought ones) and their similar products, merged in one
        reciprocal-rank vote, so a product that complements or resembles several of them leads;
        then top buys, while the list is short. Never a product of the cart nor an inactive one;
        unknown products are ignored and listed. `sources` says which of bought_together, similar,
        popular contributed (`source`: the largest vote for the first product).
        """
        return Response(await cart_answer(svc, cart), media_type=JSON)

    @app.get(
        "/top-buys", response_model=TopBuys, dependencies=read_access,
        responses={**read_errors, 404: ERRORS[404], 422: ERRORS[422]},
    )
    async def get_top_buys(svc: Service, n: PageSize = 10, category: Category = None) -> TopBuys:
        """Most bought active products (not excluded by a rule), overall or within a category."""
        live = await svc.current()
        _check_category(live, category)
        entry = await svc.top_buys(live, category)
        kept_out = svc.kept_out_for_everyone(live)
        if entry is not None:
            kept = _filtered(live, entry["top_buys"], set(), None, kept_out)
            if len(kept) >= n:
                return TopBuys(category=category, version=live.version, ranked_on_request=False, top_buys=_outputs(live, kept, 0, n))
        blocked = [] if kept_out is None else kept_out.blocked_items.tolist()
        ranked = await svc.run(rank_popular, live, blocked, category, n)
        return TopBuys(category=category, version=live.version, ranked_on_request=True, top_buys=_outputs(live, ranked, 0, n))

    @app.get("/model", response_model=ModelInfo, dependencies=read_access, responses=read_errors)
    async def get_model(svc: Service) -> dict:
        """The live version: data window, holdout metrics, params, counts, publish time."""
        pointer = await svc.store.pointer()
        meta = None if pointer is None else await svc.store.meta(pointer)
        if meta is None:
            raise NothingLive
        return {**public_meta(meta), "fold_in_users": await svc.store.fold_in_users(pointer.build, meta["buckets"])}

    @app.get("/health/live", response_model=Health)
    async def health_live() -> Health:
        """The process answers."""
        return Health(status="ok")

    @app.get("/health/ready", response_model=Health)
    async def health_ready(svc: Service) -> Health:
        """Redis answers and a version is live (503 otherwise). `degraded` while the merchandising
        rules cannot be read from the shop database."""
        pointer = await svc.store.pointer(fresh=True)  # Redis must answer now
        if pointer is None:
            raise NothingLive
        version = pointer.version
        if svc.rules_read_problem is not None:
            live = await svc.model_for(pointer)
            _, source = svc.rules_in_force(live)
            applied = {"published": "the rules the live version was published with",
                       "database": "the rules read last", "none": "no rules"}[source]
            detail = f"merchandising rules not read: {svc.rules_read_problem}; applying {applied}"
            return Health(status="degraded", version=version, detail=detail)
        return Health(status="ok", version=version)

    # the three busiest requests answered in front of the app (same functions, same bytes)
    return HotPaths(app, svc, api_keys, settings.api_public_reads, settings.api_max_body_bytes)


def _freeze_heap() -> None:
    """Move every object alive now (the imported modules, the live model: ~180,000 in a worker)
    out of the cyclic GC's reach. Under load the objects of requests in flight survive young
    collections, and every few seconds a full collection traversed them all: 80-500 ms with the
    event loop stopped, the cart's p99 at 2,000 req/s (docs/serving.md). Frozen objects are still
    freed by reference counting; only cycles among them would stay (they are the process's own)."""
    gc.collect()
    gc.freeze()


def server_app() -> HotPaths:
    """The app of one ``recsys serve`` worker process (a uvicorn factory: each worker builds its
    own Redis client, live-model cache and thread pool)."""
    from threadpoolctl import threadpool_limits

    # requests are ranked in parallel on a thread pool; a multi-threaded BLAS under each would
    # oversubscribe the cores (process-wide on purpose: this process only serves)
    threadpool_limits(limits=1, user_api="blas")
    return create_api(Settings(), freeze_heap=True)


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
        "recsys.serving.api:server_app", factory=True, host=host, port=port, workers=workers, access_log=access_log,
        loop="uvloop", http="httptools",
    )


NO_KEYS_HELP = f"""error: no API key configured, so every request would be refused. Make one with
  {NEW_KEY_COMMAND}
(or `python -c "from recsys.serving.security import new_api_key; print(new_api_key('write'))"`) and start with
  RECSYS_API_KEYS=write:<key> recsys serve
(entries scope:key, comma-separated; scope read or write), or set RECSYS_API_PUBLIC_READS=true for a
read-only API open to anyone. See docs/security.md."""
