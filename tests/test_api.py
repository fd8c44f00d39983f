"""The recommendation API (``recsys.api``) on a really published version, real Redis and Postgres."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import anyio
import httpx
import pytest
import schemathesis
import uvicorn
from schemathesis.specs.openapi.checks import positive_data_acceptance
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings

from conftest import days_before, insert_interactions
from recsys import api, db, store
from recsys.api import create_api
from recsys.lookup_app import create_app as create_lookup_app
from recsys.params import PipelineParams
from recsys.pipeline import run_pipeline
from recsys.publish import publish
from recsys.settings import Settings


@pytest.fixture
def published(settings: Settings, demo_loaded, window_end: datetime) -> dict:
    run_pipeline(settings, window_end, PipelineParams())
    return store.live_meta(store.redis_client(settings), store.layout(settings))


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_api(settings)) as test_client:
        yield test_client


def _stored(settings: Settings, user_id: str) -> dict | None:
    return store.user_recommendations(store.redis_client(settings), store.layout(settings), user_id)


def _live_user(settings: Settings) -> str:
    return store.redis_client(settings).hrandfield(store.layout(settings).live("user_recs"))


def _bought(settings: Settings, user_id: str) -> set[int]:
    with db.connect(settings) as conn:
        rows = conn.execute(
            "SELECT DISTINCT product_id FROM interactions WHERE user_id = %s AND event_type IN ('purchase', 'rating')",
            (user_id,),
        ).fetchall()
    return {int(product_id) for (product_id,) in rows}


def _categories(settings: Settings) -> dict[int, str]:
    with db.connect(settings) as conn:
        return {int(p): c for p, c in conn.execute("SELECT product_id, category FROM products").fetchall()}


def _inactive(settings: Settings) -> set[int]:
    with db.connect(settings) as conn:
        return {int(p) for (p,) in conn.execute("SELECT product_id FROM products WHERE NOT active").fetchall()}


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_known_user_gets_the_published_list_and_deeper_pages(published: dict, settings: Settings, client: TestClient):
    user_id = _live_user(settings)
    stored = _stored(settings, user_id)["recommended_products"]

    first = client.get(f"/users/{user_id}/recommendations").json()
    page = client.get(f"/users/{user_id}/recommendations", params={"n": 5, "offset": 5}).json()
    deep = client.get(f"/users/{user_id}/recommendations", params={"n": 30}).json()

    assert first["source"] == "model" and not first["ranked_on_request"]
    assert first["version"] == published["version"]
    assert first["recommended_products"] == stored
    assert page["recommended_products"] == stored[5:10]
    # beyond the 10 published: ranked on request from the same factors, same order at the top
    assert deep["ranked_on_request"] and len(deep["recommended_products"]) == 30
    assert deep["recommended_products"][:10] == stored
    assert not set(deep["recommended_products"]) & (_bought(settings, user_id) | _inactive(settings))


def test_excludes_and_category_filter(published: dict, settings: Settings, client: TestClient):
    user_id = _live_user(settings)
    stored = _stored(settings, user_id)["recommended_products"]
    categories = _categories(settings)
    category = categories[stored[0]]

    excluded = client.get(
        f"/users/{user_id}/recommendations", params={"exclude": f"{stored[0]},{stored[1]}"}
    ).json()["recommended_products"]
    within = client.get(f"/users/{user_id}/recommendations", params={"category": category, "n": 8}).json()

    assert len(excluded) == 10 and not {stored[0], stored[1]} & set(excluded)
    assert excluded[:8] == stored[2:]
    assert len(within["recommended_products"]) == 8
    assert {categories[p] for p in within["recommended_products"]} == {category}
    assert not set(within["recommended_products"]) & (_bought(settings, user_id) | _inactive(settings))
    unknown = client.get(f"/users/{user_id}/recommendations", params={"category": "no-such-category"})
    assert unknown.status_code == 404 and "no-such-category" in unknown.json()["detail"]


def test_unknown_user_with_interactions_is_folded_in(
    published: dict, settings: Settings, client: TestClient, window_end: datetime
):
    bought = _stored(settings, _live_user(settings))["recommended_products"][:3]
    insert_interactions(
        settings,
        [("new-shopper", str(p), "purchase", 1.0, days_before(window_end, 2)) for p in bought]
        # after the version's window: still used, the fold-in reads everything since its start
        + [("new-shopper", str(bought[0]), "view", None, window_end + timedelta(hours=5))],
    )

    response = client.get("/users/new-shopper/recommendations", params={"n": 20})

    assert response.status_code == 200
    body = response.json()
    assert body["source"] == "fold_in" and body["ranked_on_request"] and body["user_id"] == "new-shopper"
    assert len(body["recommended_products"]) == 20
    assert not set(body["recommended_products"]) & (set(bought) | _inactive(settings))


def test_unknown_user_without_interactions_gets_top_buys(published: dict, settings: Settings, client: TestClient):
    client_redis, keys = store.redis_client(settings), store.layout(settings)
    top = store.top_buys(client_redis, keys)["top_buys"]
    category = _categories(settings)[top[0]]
    top_in_category = store.top_buys(client_redis, keys, category)["top_buys"]

    everything = client.get("/users/424242/recommendations", params={"n": 5}).json()
    within = client.get("/users/424242/recommendations", params={"n": 3, "category": category}).json()
    deep = client.get("/users/424242/recommendations", params={"n": 5, "offset": len(top)}).json()

    assert everything["source"] == "popular" and everything["recommended_products"] == top[:5]
    assert everything["user_id"] == 424242, "integer ids stay integers"
    assert within["recommended_products"] == top_in_category[:3]
    assert deep["source"] == "popular" and deep["ranked_on_request"] and len(deep["recommended_products"]) == 5
    assert not set(deep["recommended_products"]) & set(top)


def test_event_refreshes_the_live_list(published: dict, settings: Settings, client: TestClient):
    user_id = _live_user(settings)
    before = _stored(settings, user_id)["recommended_products"]
    lookup = TestClient(create_lookup_app(lambda: settings))

    posted = client.post(f"/users/{user_id}/events", json={"product_id": before[0], "event_type": "purchase", "value": 3})
    after = client.get(f"/users/{user_id}/recommendations").json()

    assert posted.status_code == 201, posted.text
    assert posted.json()["source"] == "fold_in" and posted.json()["event_stored"]
    assert before[0] not in posted.json()["recommended_products"], "just bought: never recommended again"
    assert posted.json()["recommended_products"] != before
    assert after["source"] == "fold_in" and not after["ranked_on_request"]
    assert after["recommended_products"] == posted.json()["recommended_products"]
    assert lookup.get(f"/api/users/{user_id}").json()["recommended_products"] == after["recommended_products"]
    assert before[0] in _bought(settings, user_id), "the event is in the shop's interactions table"

    # a brand-new user: popular first, then a fold-in of their first event
    assert client.get("/users/first-timer/recommendations").json()["source"] == "popular"
    client.post("/users/first-timer/events", json={"product_id": str(before[1]), "event_type": "add_to_cart"})
    assert client.get("/users/first-timer/recommendations").json()["source"] == "fold_in"


def test_new_version_is_loaded_and_never_clobbered(published: dict, settings: Settings, client: TestClient):
    user_id = _live_user(settings)
    assert client.get(f"/users/{user_id}/recommendations").json()["version"] == published["version"]
    old_live = client.app.state.service._live
    matrix_dir = Path(published["matrix_dir"])

    # another version of the same window (other params -> other name), switched live
    newer = publish(
        settings, matrix_dir, Path(published["model_path"]).parent, matrix_dir.parent / "eval" / "report.json",
        PipelineParams.from_dict({**published["params"], "top_n": 5}),
    )
    body = client.get(f"/users/{user_id}/recommendations", params={"n": 5}).json()

    assert newer.version != published["version"]
    assert body["version"] == newer.version and body["recommended_products"] == _stored(settings, user_id)["recommended_products"]
    assert client.app.state.service._live.version == newer.version
    assert client.get("/model").json()["version"] == newer.version
    # a fold-in computed against the replaced version must not land in the new one
    written = client.portal.call(client.app.state.service.write_if_live, old_live.version, user_id, {"user_id": 0})
    assert written is False
    assert _stored(settings, user_id)["user_id"] != 0


def test_similar_top_buys_model_and_health(published: dict, settings: Settings, client: TestClient):
    redis_client, keys = store.redis_client(settings), store.layout(settings)
    product = store.top_buys(redis_client, keys)["top_buys"][0]
    stored = store.similar_products(redis_client, keys, str(product))["similar_products"]

    assert client.get(f"/products/{product}/similar", params={"n": 4}).json()["similar_products"] == stored[:4]
    deep = client.get(f"/products/{product}/similar", params={"n": 25}).json()
    assert deep["ranked_on_request"] and len(deep["similar_products"]) == 25 and product not in deep["similar_products"]
    assert client.get("/products/no-such-product/similar").status_code == 404
    top = client.get("/top-buys", params={"n": 30}).json()["top_buys"]
    assert top[:20] == store.top_buys(redis_client, keys)["top_buys"] and not set(top) & _inactive(settings)
    model = client.get("/model").json()
    assert model["version"] == published["version"] and set(model["metrics"]) == {"model", "popularity"}
    assert "model_path" not in model
    assert client.get("/health/live").json() == {"status": "ok", "version": None}
    assert client.get("/health/ready").json()["version"] == published["version"]


@pytest.mark.parametrize(
    ("method", "path", "payload", "status", "says"),
    [
        ("get", "/users/1/recommendations?n=0", None, 422, "query.n"),
        ("get", "/users/1/recommendations?n=101", None, 422, "query.n"),
        ("get", "/users/1/recommendations?offset=-1", None, 422, "query.offset"),
        ("get", "/users/1/recommendations?n=ten", None, 422, "query.n"),
        ("get", "/users/" + "x" * 129 + "/recommendations", None, 422, "path.user_id"),
        ("get", "/users/1/recommendations?exclude=" + ",".join(map(str, range(501))), None, 422, "at most 500"),
        ("get", "/top-buys?category=nope", None, 404, "Unknown category 'nope'"),
        ("post", "/users/1/events", {"product_id": 1, "event_type": "wishlist"}, 422, "use one of"),
        ("post", "/users/1/events", {"product_id": 1, "event_type": "view", "value": -1}, 422, "body.value"),
        ("post", "/users/1/events", {"product_id": 1, "event_type": "view", "value": 1e9}, 422, "max_value"),
        ("post", "/users/1/events", {"product_id": "no-such-product", "event_type": "view"}, 404, "not in the catalogue"),
        ("post", "/users/1/events", {"product_id": 1, "event_type": "view", "timestamp": "2999-01-01T00:00:00Z"}, 422, "future"),
        ("post", "/users/1/events", {"product_id": 1, "event_type": "view", "color": "red"}, 422, "body.color"),
    ],
)
def test_bad_input_is_4xx_with_a_message(
    published: dict, client: TestClient, method: str, path: str, payload: dict | None, status: int, says: str
):
    response = client.request(method, path, json=payload)

    assert response.status_code == status, response.text
    assert says in response.json()["detail"]


def test_nan_value_is_refused(published: dict, client: TestClient):
    raw = '{"product_id": 1, "event_type": "view", "value": NaN}'
    response = client.post("/users/1/events", content=raw, headers={"content-type": "application/json"})

    assert response.status_code == 422


def test_redis_down_is_503_never_500(settings: Settings):
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{_closed_port()}/0"})
    with TestClient(create_api(down), raise_server_exceptions=False) as client:
        for path in ("/users/1/recommendations", "/products/1/similar", "/top-buys", "/model", "/health/ready"):
            response = client.get(path)
            assert response.status_code == 503, path
            assert response.json() == {"detail": "Redis is unavailable; try again later"}
        assert client.post("/users/1/events", json={"product_id": 1, "event_type": "view"}).status_code == 503
        assert client.get("/health/live").status_code == 200


def test_nothing_published_is_503(settings: Settings, client: TestClient):
    response = client.get("/users/1/recommendations")

    assert response.status_code == 503 and "No version is live" in response.json()["detail"]
    assert client.get("/health/ready").status_code == 503


def test_a_slow_fold_in_does_not_block_other_users(
    published: dict, settings: Settings, monkeypatch: pytest.MonkeyPatch
):
    release = threading.Event()
    real_fetch = api.fetch_user_events

    def slow_fetch(*args):
        release.wait(10)
        return real_fetch(*args)

    monkeypatch.setattr(api, "fetch_user_events", slow_fetch)
    app = create_api(settings)
    user_id = _live_user(settings)

    async def scenario() -> list[str]:
        done: list[str] = []
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:

            async def cold() -> None:
                await http.get("/users/cold-user/recommendations")
                done.append("cold")

            async def known() -> None:
                for _ in range(5):
                    assert (await http.get(f"/users/{user_id}/recommendations")).status_code == 200
                done.append("known")
                release.set()

            async with anyio.create_task_group() as group:
                group.start_soon(cold)
                await anyio.sleep(0.05)
                group.start_soon(known)
        await app.state.service.aclose()
        return done

    assert anyio.run(scenario) == ["known", "cold"]


# --- property-based: the generated OpenAPI schema, no server errors ----------------------------


@pytest.fixture
def served(published: dict, settings: Settings) -> Iterator[str]:
    """The API under a real uvicorn on loopback: one event loop for the whole test, like production."""
    server = uvicorn.Server(uvicorn.Config(create_api(settings), host="127.0.0.1", port=_closed_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(10)


def test_openapi_schema_holds_and_nothing_is_a_server_error(served: str):
    schema = schemathesis.openapi.from_url(f"{served}/openapi.json")

    # every default check (server errors, status codes, response schemas, negative data) except
    # "schema-valid means accepted": event types and categories belong to the live version, so a
    # static schema cannot enumerate them and a schema-valid request may rightly get a 422/404
    @given(case=schema.as_strategy())
    @hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    def no_server_error(case) -> None:
        case.call_and_validate(excluded_checks=[positive_data_acceptance])

    no_server_error()
