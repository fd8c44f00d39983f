"""Read-only HTTP lookup of what is live in Redis: one user's recommendations (or the top buys a
user without a list gets), top buys by category, the live model; decorated from PostgreSQL with
product names, the run history and the running experiment when the database answers; and the
runs' evaluation reports, from the artifact store, for the links to them in the Airflow UI.

Plain FastAPI with no Airflow import, so it runs the same under the Airflow plugin
(``plugins/recsys_plugin.py`` mounts it in the api-server), under uvicorn, and in tests.
Settings come from a factory called on every request, so a changed connection needs no restart.
Reads go through the same functions as the recommendation API (``recsys.api``), so both always
show the same thing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import psycopg
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from recsys.core import ids
from recsys.core.errors import InputError
from recsys.core.layout import published_report, run_report
from recsys.core.params import PipelineParams
from recsys.core.settings import Settings
from recsys.serving import lookup_reads
from recsys.serving.explanations import explained_products
from recsys.serving.links import RUN_REPORTS, run_report_path
from recsys.serving.live_model import LiveModel, load_live_model
from recsys.storage.connection import UNAVAILABLE
from recsys.storage.keys import TOP_BUYS_ALL, top_buys_field
from recsys.storage.live import LiveStore, Pointer
from recsys.storage.reads import public_meta

log = logging.getLogger(__name__)

SettingsFactory = Callable[[], Settings]

# what a user without a list of their own is shown (the API's cold-start answer without events)
POPULAR_SOURCE = "popular"
# product names looked up per request: a page shows at most a few lists of top_n / top_buys_n ids
MAX_LABELLED_PRODUCTS = 200
MAX_HISTORY_RUNS = 100
SHOP_DB_UNAVAILABLE = "Shop database unavailable; see the API server log."


def _resolve_settings(settings_factory: SettingsFactory) -> Settings:
    try:
        return settings_factory()
    except Exception as error:
        # a message (e.g. a pydantic validation error) may echo a URL with its password
        log.exception("could not resolve recsys settings")
        raise HTTPException(
            status_code=503, detail="Recsys settings could not be resolved; see the API server log."
        ) from error


def _open_store(settings_factory: SettingsFactory) -> LiveStore:
    settings = _resolve_settings(settings_factory)
    try:
        # the pointer read afresh on every request: the page shows what is live now
        return LiveStore(settings, max_pointer_age=0)
    except RuntimeError as missing:
        # Settings.require_* raise RuntimeError with a message meant for the operator
        raise HTTPException(status_code=503, detail=str(missing)) from missing
    except Exception as error:
        # e.g. a malformed Redis URL, whose message may echo its password
        log.exception("could not open a Redis client from the recsys settings")
        raise HTTPException(
            status_code=503, detail="Recsys settings could not be resolved; see the API server log."
        ) from error


def _nothing_live(live: LiveStore) -> HTTPException:
    return HTTPException(
        status_code=404, detail=f"Nothing is live under Redis prefix {live.keys.prefix!r}: no version published yet."
    )


async def _live_pointer(live: LiveStore) -> Pointer:
    pointer = await live.pointer()
    if pointer is None:
        raise _nothing_live(live)
    return pointer


async def live_store(request: Request) -> AsyncIterator[LiveStore]:
    """Per request: fresh settings, and a client closed once the response is out."""
    live = _open_store(request.app.state.settings_factory)
    try:
        yield live
    finally:
        await live.aclose()


Live = Annotated[LiveStore, Depends(live_store)]


async def _read_shop_db(request: Request, read: Callable[[Settings], Any]) -> Any:
    """``read(settings)`` in a thread; any failure is a 503 whose text names no address."""
    settings = _resolve_settings(request.app.state.settings_factory)
    try:
        return await run_in_threadpool(read, settings)
    except RuntimeError as missing:
        # Settings.require_database_url: no database configured, said for the operator
        raise HTTPException(status_code=503, detail=str(missing)) from missing
    except psycopg.Error as error:
        log.warning("shop database unavailable for %s: %s", request.url.path, error)
        raise HTTPException(status_code=503, detail=SHOP_DB_UNAVAILABLE) from error
    except InputError as error:  # a table of a newer release is missing: says to run recsys init-db
        raise HTTPException(status_code=503, detail=str(error)) from error


def compare_params(live: dict | None) -> list[dict]:
    """Each live param with its default; ``tuned`` when it differs (set by tuning or by hand)."""
    defaults = PipelineParams().to_dict()
    return [
        {"name": name, "value": value, "default": defaults.get(name), "tuned": name not in defaults or value != defaults[name]}
        for name, value in sorted((live or {}).items())
    ]


def app_url(request: Request, path: str) -> str:
    """The absolute URL of this app's ``path`` as the browser reaches it. The app is mounted (by the
    Airflow api-server under ``/recsys``, itself maybe under a base path): the mount's prefix is
    the scope's root_path. ``request.url_for`` cannot be used: Airflow mounts a lazily built app, whose
    routes the api-server's router cannot see."""
    return str(request.url.replace(path=request.scope.get("root_path", "") + path, query=""))


def id_type_hint(meta: dict | None, user_id: str) -> str | None:
    """Why a user id cannot have a list: the live version publishes integer user ids and this one
    is not one (a typo, or an id of another system)."""
    user_type = ((meta or {}).get("id_types") or {}).get("user")
    if user_type is None or ids.fits(user_type, user_id):
        return None
    return (f"The live version's user ids are integers (below 2^53, no leading zeros); {user_id!r} is not one, "
            "so it can never have a list of its own.")


def _redis_unavailable(request: Request, error: Exception) -> JSONResponse:
    # the error text names Redis' host and port: the log has it, the page gets the kind only
    log.warning("Redis unavailable for %s: %s", request.url.path, error)
    return JSONResponse(status_code=503, content={"detail": "Redis is unavailable; try again later"})


def create_app(settings_factory: SettingsFactory, dependencies: Sequence[Any] = ()) -> FastAPI:
    """The lookup app. ``dependencies`` guard every route (the plugin passes Airflow's auth check)."""
    # no /docs or /redoc: they load their assets from a CDN, and the page below is the UI
    app = FastAPI(title="Recsys lookup", docs_url=None, redoc_url=None, dependencies=list(dependencies))
    for error in UNAVAILABLE:
        app.add_exception_handler(error, _redis_unavailable)
    app.state.settings_factory = settings_factory
    app.state.live_model = None  # loaded on the first explanation asked for, once per version
    app.state.live_model_lock = threading.Lock()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return LOOKUP_PAGE

    # :path so that ids containing "/" (ids are free text in the shop) still resolve
    @app.get("/api/users/{user_id:path}")
    async def user_recommendations(user_id: str, live: Live) -> dict:
        """The user's live list, else the overall top buys with ``source: popular`` (what a shop
        page shows a user without a list), never a bare 404 while a version is live."""
        pointer, found, _ = await live.user_entry(user_id)
        if pointer is None:
            raise _nothing_live(live)
        if found is not None:
            return {"source": "model", **found}
        popular = (await live.top_buys(pointer.build))[TOP_BUYS_ALL]
        answer = {"user_id": user_id, "source": POPULAR_SOURCE, "recommended_products": popular["top_buys"]}
        hint = id_type_hint(await live.meta(pointer), user_id)
        return answer if hint is None else {**answer, "hint": hint}

    async def _live_report(request: Request, live: LiveStore) -> Path | None:
        pointer = await live.pointer()
        meta = None if pointer is None else await live.meta(pointer)
        if meta is None:
            return None
        settings = _resolve_settings(request.app.state.settings_factory)
        return await run_in_threadpool(published_report, settings, meta)

    @app.get("/api/explain/{user_id:path}")
    async def explain(request: Request, user_id: str, live: Live) -> dict:
        """Why the user's live list holds each product: the past products weighing most in its
        score (users the model knows) and the merchandising rules in force that target it."""
        pointer, entry, _ = await live.user_entry(user_id)
        meta = None if pointer is None else await live.meta(pointer)
        if entry is None or meta is None:
            return {"explanations": [], "note": "No list of the user's own: top buys have nothing to explain.", "rules": {}}
        products = entry["recommended_products"]
        settings = _resolve_settings(request.app.state.settings_factory)
        explanations, note = [], None
        try:
            model = await run_in_threadpool(_live_model, request.app, meta, settings)
        except Exception:  # the artifacts may live on another host: the page still shows the list
            log.warning("live model not loadable on this host", exc_info=True)
            note = "The live model's artifacts are not readable on this host: no explanations."
        else:
            if user_id in model.user_index:
                row = model.confidence[model.user_index[user_id]]
                explanations = await run_in_threadpool(explained_products, model, row, products)
            else:
                note = "The user joined after the live version was trained (a fold-in): the API explains such lists."
        try:
            rules = await _read_shop_db(request, lambda s: lookup_reads.rules_touching(s, user_id, products))
        except HTTPException:
            rules = {}
        return {"explanations": explanations, "note": note, "rules": rules}

    @app.get("/api/rules")
    async def rules(request: Request) -> dict:
        """Every merchandising rule with its status now (in force, scheduled, expired)."""
        return {"rules": await _read_shop_db(request, lookup_reads.rules_table)}

    @app.get("/api/model")
    async def model(request: Request, live: Live) -> dict:
        meta = await live.meta(await _live_pointer(live))
        if meta is None:
            raise _nothing_live(live)
        # report: the live version's evaluation report, served below; else a link the meta names
        report = app_url(request, "/report") if await _live_report(request, live) else meta.get("report")
        return {**public_meta(meta), "report": report, "params_compared": compare_params(meta.get("params"))}

    @app.get("/report", response_class=HTMLResponse, include_in_schema=False)
    async def live_report(request: Request, live: Live) -> FileResponse:
        """The live version's evaluation report (self-contained HTML with its plots)."""
        found = await _live_report(request, live)
        if found is None:
            raise HTTPException(status_code=404, detail="The live version has no evaluation report on this host.")
        return FileResponse(found, media_type="text/html")

    # :path: a run id given to the trigger API is free text
    @app.get(f"{RUN_REPORTS}/{{dag_run_id:path}}", response_class=HTMLResponse, include_in_schema=False)
    async def run_report_page(request: Request, dag_run_id: str) -> FileResponse:
        """The evaluation report an Airflow run of recsys_daily wrote (its evaluate task's extra link
        points here), from the shared artifact store when one is configured: it works wherever the
        run's worker was."""
        key = await _read_shop_db(request, lambda settings: lookup_reads.run_key_of(settings, dag_run_id))
        if key is None:
            raise HTTPException(status_code=404, detail=f"Run {dag_run_id!r} has recorded no evaluation (yet) in recsys_runs.")
        settings = _resolve_settings(request.app.state.settings_factory)
        found = await run_in_threadpool(run_report, settings, key)
        if found is None:
            raise HTTPException(status_code=404, detail=f"Run {dag_run_id!r} evaluated {key}, whose report is not in the artifacts.")
        return FileResponse(found, media_type="text/html")

    @app.get("/api/experiment")
    async def experiment(request: Request, user_id: str | None = None) -> dict:
        """The experiment running now (else the last one): variants, shares, status, exposed users,
        click-through and conversion with 95 % intervals, lifts, the sample-ratio check and the
        guardrails, as ``recsys experiments report NAME --no-act`` computes them now; with
        ``user_id``, that user's variant now."""
        return await _read_shop_db(request, lambda settings: lookup_reads.experiment_overview(settings, user_id))

    @app.get("/api/top-buys/categories")
    async def top_buys_categories(live: Live) -> dict:
        fields = await live.top_buys((await _live_pointer(live)).build)
        prefix = top_buys_field("")
        return {"categories": sorted(field.removeprefix(prefix) for field in fields if field.startswith(prefix))}

    @app.get("/api/top-buys")
    async def top_buys(live: Live, category: str | None = None) -> dict:
        found = (await live.top_buys((await _live_pointer(live)).build)).get(top_buys_field(category))
        if found is None:
            raise HTTPException(status_code=404, detail=f"No live top buys for category {category!r}.")
        return found

    @app.get("/api/products")
    async def products(request: Request, ids: Annotated[list[str], Query(max_length=MAX_LABELLED_PRODUCTS)]) -> dict:
        """Names and categories from the shop's ``products`` table; 503 when it cannot be read."""
        return {"products": await _read_shop_db(request, lambda settings: lookup_reads.product_labels(settings, ids))}

    @app.get("/api/runs")
    async def runs(request: Request, limit: Annotated[int, Query(ge=1, le=MAX_HISTORY_RUNS)] = 30) -> dict:
        """The latest runs of the pipeline's history in date order (window end, then recording), each
        with the link to its report when an Airflow run recorded it; ``available: false`` before
        ``recsys_runs`` exists."""
        found = await _read_shop_db(request, lambda settings: lookup_reads.recent_runs(settings, limit))
        return {
            "available": found is not None,
            "runs": [
                {**run, "report_url": app_url(request, run_report_path(run["dag_run_id"]))} if run.get("dag_run_id") else run
                for run in found or []
            ],
        }

    return app


def _live_model(app: FastAPI, meta: dict, settings: Settings) -> LiveModel:
    with app.state.live_model_lock:
        if app.state.live_model is None or app.state.live_model.build != meta["build"]:
            app.state.live_model = load_live_model(meta, settings)
        return app.state.live_model


# Self-contained (no external assets). Every value from the user or from Redis reaches the DOM
# through textContent, never innerHTML, so nothing is interpreted as markup. Fetch URLs are
# relative: the app is mounted under a prefix (and Airflow possibly under a base path).
LOOKUP_PAGE = resources.files(__package__).joinpath("templates", "lookup.html").read_text()

