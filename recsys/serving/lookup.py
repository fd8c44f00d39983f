"""Read-only HTTP lookup of what is live in Redis: one user's recommendations, the live model.

Plain FastAPI with no Airflow import, so it runs the same under the Airflow plugin
(``plugins/recsys_plugin.py`` mounts it in the api-server), under uvicorn, and in tests.
Settings come from a factory called on every request, so a changed connection needs no restart.
Reads go through the same functions as the recommendation API (``recsys.api``), so both always
show the same thing.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any

import redis
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse

from recsys.core import redis_keys
from recsys.core.settings import Settings

log = logging.getLogger(__name__)

SettingsFactory = Callable[[], Settings]

@dataclass(frozen=True)
class LiveStore:
    client: aioredis.Redis
    keys: redis_keys.KeyLayout


def _open_store(settings_factory: SettingsFactory) -> LiveStore:
    try:
        settings = settings_factory()
        client = aioredis.Redis.from_url(settings.require_redis_url, decode_responses=True, socket_connect_timeout=5)
        return LiveStore(client, redis_keys.layout(settings))
    except RuntimeError as missing:
        # Settings.require_* raise RuntimeError with a message meant for the operator
        raise HTTPException(status_code=503, detail=str(missing)) from missing
    except Exception as error:
        # other messages (e.g. a pydantic validation error) may echo a URL with its password
        log.exception("could not resolve recsys settings")
        raise HTTPException(
            status_code=503, detail="Recsys settings could not be resolved; see the API server log."
        ) from error


def _nothing_live(keys: redis_keys.KeyLayout) -> HTTPException:
    return HTTPException(
        status_code=404, detail=f"Nothing is live under Redis prefix {keys.prefix!r}: no version published yet."
    )


async def _not_found(live: LiveStore, what: str) -> HTTPException:
    """404 that tells 'nothing published yet' apart from 'not in the published version'."""
    if not await live.client.exists(live.keys.live("meta")):
        return _nothing_live(live.keys)
    return HTTPException(status_code=404, detail=what)


async def live_store(request: Request) -> AsyncIterator[LiveStore]:
    """Per request: fresh settings, and a client closed once the response is out."""
    live = _open_store(request.app.state.settings_factory)
    try:
        yield live
    finally:
        await live.client.aclose()


Live = Annotated[LiveStore, Depends(live_store)]


def _redis_unavailable(request: Request, error: Exception) -> JSONResponse:
    # the error text names Redis' host and port: the log has it, the page gets the kind only
    log.warning("Redis unavailable for %s: %s", request.url.path, error)
    return JSONResponse(status_code=503, content={"detail": "Redis is unavailable; try again later"})


def create_app(settings_factory: SettingsFactory, dependencies: Sequence[Any] = ()) -> FastAPI:
    """The lookup app. ``dependencies`` guard every route (the plugin passes Airflow's auth check)."""
    # no /docs or /redoc: they load their assets from a CDN, and the page below is the UI
    app = FastAPI(title="Recsys lookup", docs_url=None, redoc_url=None, dependencies=list(dependencies))
    app.add_exception_handler(redis.ConnectionError, _redis_unavailable)
    app.add_exception_handler(redis.TimeoutError, _redis_unavailable)
    app.state.settings_factory = settings_factory

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return LOOKUP_PAGE

    # :path so that ids containing "/" (ids are free text in the shop) still resolve
    @app.get("/api/users/{user_id:path}")
    async def user_recommendations(user_id: str, live: Live) -> dict:
        found = await redis_keys.read_entry(live.client, redis_keys.user_recs_slot(live.keys, user_id))
        if found is None:
            raise await _not_found(live, f"User {user_id!r} has no live recommendations.")
        return found

    @app.get("/api/model")
    async def model(live: Live) -> dict:
        meta = await redis_keys.read_meta(live.client, live.keys)
        if meta is None:
            raise _nothing_live(live.keys)
        return redis_keys.public_meta(meta)

    @app.get("/api/top-buys")
    async def top_buys(live: Live, category: str | None = None) -> dict:
        found = await redis_keys.read_entry(live.client, redis_keys.top_buys_slot(live.keys, category))
        if found is None:
            raise await _not_found(live, f"No live top buys for category {category!r}.")
        return found

    return app


# Self-contained (no external assets). Every value from the user or from Redis reaches the DOM
# through textContent, never innerHTML, so nothing is interpreted as markup. Fetch URLs are
# relative: the app is mounted under a prefix (and Airflow possibly under a base path).
LOOKUP_PAGE = resources.files(__package__).joinpath("templates", "lookup.html").read_text()

