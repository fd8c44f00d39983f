"""The hot paths (recsys.serving.hot_path) answer the same bytes as the FastAPI routes, on the same
data, for every kind of user, product and cart; anything they do not take is left to the routes."""

from __future__ import annotations

import json
import re
import secrets
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from helpers import live, published_entries, serve_experiment

from recsys.core.experiments import Experiment, Variant
from recsys.core.params import PipelineParams
from recsys.core.rules import Rule, add_rule
from recsys.core.settings import Settings
from recsys.local.services import free_port
from recsys.pipeline.stages import run_pipeline
from recsys.serving import api as api_module
from recsys.serving.api import create_api

KEY = secrets.token_urlsafe(32)
SLOW = {"_": "slow"}  # a parameter the routes ignore and the hot paths leave to them
RECOMMENDATION_ID = re.compile(rb'"recommendation_id":"([0-9a-f]{32})"')
# served with the lists: a variant ranked from the live model with other params, and one with a
# model of its own (its published lists are served as stored)
EXPERIMENT = Experiment(
    "diversity", (Variant("control", 0.35), Variant("plain", 0.35, {"diversity_lambda": 0.0, "top_n": 12}),
                  Variant("bigger", 0.2, {"factors": 16})),
    salt="hot-path-test", starts_at=datetime.now(UTC) - timedelta(days=1),
)


@pytest.fixture
def api(settings: Settings, demo_loaded, window_end: datetime, monkeypatch):
    """A published version serving an experiment, with rules in force (an exclude and a pin), a
    user with negative feedback; the API with a counter of the requests its routes (not the hot
    paths) answered."""
    run_pipeline(settings, window_end, PipelineParams())
    serve_experiment(settings, EXPERIMENT, datetime.now(UTC))
    lists = published_entries(settings)
    first_user = sorted(lists)[0]
    listed = lists[first_user]["recommended_products"]
    add_rule(settings, Rule("exclude", product_id=str(listed[1])))
    add_rule(settings, Rule("pin", product_id=str(listed[-1]), rank=1))
    routed = {"user": 0, "similar": 0, "cart": 0}
    for name, function in (("user", "user_recommendations"), ("similar", "similar_products"), ("cart", "cart_answer")):
        original = getattr(api_module, function)

        async def counted(*args, _name=name, _original=original, **kwargs):
            routed[_name] += 1
            return await _original(*args, **kwargs)

        monkeypatch.setattr(api_module, function, counted)
    configured = settings.model_copy(update={"api_keys": f"write:{KEY}", "rules_refresh_seconds": 0.1})
    with TestClient(create_api(configured), headers={"X-API-Key": KEY}) as client:
        client.post(f"/users/{first_user}/events", json={"product_id": listed[2], "event_type": "dislike"})
        client.app.state.routed = routed
        yield client


def same(client: TestClient, method: str, path: str, **options) -> bytes:
    """The hot path's answer, after checking it is the route's byte for byte, apart from the
    recommendation_id of a user's list: one in each, a new one each time."""
    fast = client.request(method, path, **options)
    params = {**options.pop("params", {}), **SLOW}
    slow = client.request(method, path, params=params, **options)
    ids = [RECOMMENDATION_ID.findall(answer.content) for answer in (fast, slow)]
    if "/recommendations" in path and method == "GET" and fast.status_code == 200:
        assert len(ids[0]) == len(ids[1]) == 1 and ids[0] != ids[1], ids
    fast_content, slow_content = (RECOMMENDATION_ID.sub(b"", answer.content) for answer in (fast, slow))
    assert (fast.status_code, fast_content) == (slow.status_code, slow_content), path
    assert fast.headers["content-type"] == slow.headers["content-type"]
    return fast.content


def test_every_answer_of_the_hot_paths_is_the_routes_byte_for_byte(api: TestClient, settings: Settings):
    build = live(settings)
    entries = published_entries(settings)
    # users of each variant, and users outside the experiment
    users = [user for variant in ("control", "plain", "bigger", None)
             for user in sorted(u for u, e in entries.items() if e.get("variant") == variant)[:8]]
    assert len(users) == 32, "8 users of each variant and 8 outside the experiment"
    products = [entry["recommended_products"][0] for entry in published_entries(settings).values()][:15]
    routed_before = dict(api.app.state.routed)
    answers = 0
    cold = [str(990001 + i) for i in range(6)]
    for user in [*users, *cold]:  # published lists, fold-ins and cold starts
        if user in entries:
            named = (entries[user].get("experiment"), entries[user].get("variant"))
        else:
            assigned = EXPERIMENT.assign(user, datetime.now(UTC))
            named = (EXPERIMENT.name, assigned.variant) if assigned.enrolled else (None, None)
        for params in ({}, {"n": 3}, {"n": 30}, {"n": 5, "offset": 8}, {"offset": 2}):
            body = json.loads(same(api, "GET", f"/users/{user}/recommendations", params=params))
            assert (body["experiment"], body["variant"]) == named, (user, params)
            answers += 1
    for product in products:
        for params in ({}, {"n": 4}, {"n": 40}):
            same(api, "GET", f"/products/{product}/similar", params=params)
            answers += 1
    for size in (1, 2, 5):
        same(api, "POST", "/carts/recommendations", json={"product_ids": products[:size], "n": 12})
        answers += 1
    routed = {name: count - routed_before[name] for name, count in api.app.state.routed.items()}
    # the routes answered exactly the slow half: the hot paths answered every other request
    assert sum(routed.values()) == answers, routed
    assert build.version == api.get("/model").json()["version"]


@pytest.mark.parametrize(
    ("method", "path", "options", "status"),
    [
        ("GET", "/users/1/recommendations", {"params": {"n": 0}}, 422),
        ("GET", "/users/1/recommendations", {"params": {"n": "ten"}}, 422),
        ("GET", "/users/1/recommendations", {"params": {"offset": 5000}}, 422),
        ("GET", "/users/" + "1" * 129 + "/recommendations", {}, 422),
        ("GET", "/users/not-an-int/recommendations", {}, 422),
        ("GET", "/users/1/recommendations", {"headers": {"X-API-Key": "wrong-key-0123456789"}}, 401),
        ("GET", "/products/no-such-product/similar", {}, 404),
        ("GET", "/products/999999/similar", {}, 404),
        ("POST", "/carts/recommendations", {"json": {"product_ids": []}}, 422),
        ("POST", "/carts/recommendations", {"json": {"product_ids": [True]}}, 422),
        ("POST", "/carts/recommendations", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422),
        ("POST", "/carts/recommendations", {"json": {"product_ids": [1]}, "headers": {"X-API-Key": ""}}, 401),
    ],
)
def test_what_the_hot_paths_do_not_take_the_routes_answer_as_always(api: TestClient, method, path, options, status):
    answer = api.request(method, path, **options)
    assert answer.status_code == status, answer.text
    assert answer.json()["detail"]


def count_reads(store, monkeypatch) -> Counter:
    """Every read of the live store a request's answer makes (the real reads, counted)."""
    reads: Counter = Counter()
    for name in ("user_entry", "raw_entry", "raw_entries", "pointer"):
        original = getattr(store, name)

        async def counted(*args, _name=name, _original=original, **kwargs):
            reads[_name] += 1
            return await _original(*args, **kwargs)

        monkeypatch.setattr(store, name, counted)
    return reads


@pytest.mark.parametrize(
    ("method", "path", "options", "status"),
    [
        ("GET", "/products/999999/similar", {}, 404),  # not a product of the live version
        ("GET", "/users/not-an-int/recommendations", {}, 422),  # this shop's user ids are integers
        ("POST", "/carts/recommendations", {"json": {"product_ids": ["abc"]}}, 422),  # so are its product ids
    ],
)
def test_an_error_on_a_hot_path_is_the_routes_answer_after_one_read(api: TestClient, monkeypatch, method, path, options, status):
    reads = count_reads(api.app.service.store, monkeypatch)
    fast = api.request(method, path, **options)
    fast_reads = sum(count for name, count in reads.items() if name != "pointer")
    assert (fast.status_code, fast_reads) == (status, 1), fast.text
    routed_before = dict(api.app.state.routed)
    assert same(api, method, path, **options) == fast.content
    assert sum(api.app.state.routed.values()) - sum(routed_before.values()) == 1, "only the slow request was routed"


def test_redis_down_is_503_from_the_hot_paths_after_one_read(settings: Settings, monkeypatch):
    down = settings.model_copy(update={"api_keys": f"read:{KEY}", "redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_api(down), headers={"X-API-Key": KEY}, raise_server_exceptions=False) as client:
        reads = count_reads(client.app.service.store, monkeypatch)
        for method, path, options, read in [
            ("GET", "/users/1/recommendations", {}, "user_entry"),
            ("GET", "/products/1/similar", {}, "raw_entry"),
            ("POST", "/carts/recommendations", {"json": {"product_ids": [1, 2]}}, "pointer"),
        ]:
            reads.clear()
            answer = client.request(method, path, **options)
            assert (answer.status_code, answer.json()) == (503, {"detail": "Redis is unavailable; try again later"}), path
            assert reads[read] == 1, (path, reads)  # not a second attempt through the routes
            slow = client.request(method, path, params=SLOW, **options)
            assert (slow.status_code, slow.content) == (answer.status_code, answer.content)


def test_lists_answered_as_stored_are_the_filtering_paths_byte_for_byte(
    settings: Settings, demo_loaded, window_end: datetime, monkeypatch
):
    """While the rules in force are those the live version was published with (an exclude and a
    pin here), published lists are answered as stored (``RecsysService.published_lists_hold``);
    the general path, which filters them and places the pins again, answers the same bytes for
    every user (of each variant, one with negative feedback, cold starts), product and cart."""
    run_pipeline(settings, window_end, PipelineParams())
    first = published_entries(settings)
    listed = first[sorted(first)[0]]["recommended_products"]
    add_rule(settings, Rule("exclude", product_id=str(listed[1])))
    add_rule(settings, Rule("pin", product_id=str(listed[-1]), rank=1))
    run_pipeline(settings, window_end, PipelineParams())  # published with these rules
    serve_experiment(settings, EXPERIMENT, datetime.now(UTC))
    entries = published_entries(settings)
    users = [*sorted(entries)[:40], "990001", "990002"]
    products = [entry["recommended_products"][0] for entry in entries.values()][:15]
    requests = [
        *(("GET", f"/users/{user}/recommendations", {"params": params}) for user in users
          for params in ({}, {"n": 3}, {"n": 30}, {"offset": 2})),
        *(("GET", f"/products/{product}/similar", {"params": params}) for product in products
          for params in ({}, {"n": 4})),
        *(("POST", "/carts/recommendations", {"json": {"product_ids": products[:size], "n": 12}}) for size in (1, 2, 5)),
    ]
    configured = settings.model_copy(update={"api_keys": f"write:{KEY}"})
    with TestClient(create_api(configured), headers={"X-API-Key": KEY}) as client:
        client.post(f"/users/{users[0]}/events", json={"product_id": entries[users[0]]["recommended_products"][2],
                                                       "event_type": "dislike"})
        svc = client.app.service

        def answers() -> list[tuple[int, bytes]]:
            found = []
            for method, path, options in requests:
                answer = client.request(method, path, **options)
                found.append((answer.status_code, RECOMMENDATION_ID.sub(b"", answer.content)))
            return found

        live_model = svc._live
        assert live_model is not None and svc.published_lists_hold(live_model), "the rules in force are the published ones"
        as_stored = answers()
        monkeypatch.setattr(svc, "published_lists_hold", lambda live: False)
        filtered = answers()
    assert {status for status, _ in as_stored} == {200}
    for request, stored, general in zip(requests, as_stored, filtered, strict=True):
        assert stored == general, request
