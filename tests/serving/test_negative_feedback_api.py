"""Negative feedback through the API, on a really published version (real Redis and Postgres): a
posted dislike removes the product from every list the user is served, at once and for good."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import test_api
from fastapi.testclient import TestClient
from test_api import _live_user, _stored

from recsys.core.params import PipelineParams
from recsys.core.settings import Settings
from recsys.pipeline.publish.stage import publish
from recsys.serving.fold_in import weigh_events
from recsys.serving.live_model import load_live_model
from recsys.storage import connect
from recsys.storage.reads import live_meta
from recsys.storage.versions import keys_without_ttl, live_problems

# the API suite's fixtures: a version published by the pipeline, a client with a write key
published, client = test_api.published, test_api.client


def _every_view(client: TestClient, user_id: str) -> dict[str, list]:
    """The user's products on the published page, deeper pages, ranked-on-request and diverse lists."""
    views = {
        "published": {},
        "second page": {"n": 5, "offset": 5},
        "deep page": {"n": 20, "offset": 10},
        "ranked on request": {"n": 40},
        "diverse": {"diversity_lambda": 0.6},
        "diverse deep": {"n": 10, "offset": 30, "diversity_lambda": 0.2},
    }
    shown = {}
    for name, query in views.items():
        response = client.get(f"/users/{user_id}/recommendations", params=query)
        assert response.status_code == 200, (name, response.text)
        shown[name] = response.json()["recommended_products"]
    return shown


def test_a_dislike_is_never_shown_again_on_any_path(published: dict, settings: Settings, client: TestClient):
    user_id = _live_user(settings)
    before = _every_view(client, user_id)
    disliked = before["published"][0]
    deep = before["deep page"][0]  # one from a page ranked on request
    for product in (disliked, deep):
        response = client.post(f"/users/{user_id}/events", json={"product_id": product, "event_type": "dislike"})
        assert response.status_code == 201, response.text
        assert product not in response.json()["recommended_products"]  # the refreshed fold-in list
    for name, products in _every_view(client, user_id).items():
        assert not {disliked, deep} & set(products), name

    redis, keys = connect(settings)
    key = keys.negative(user_id)
    assert redis.smembers(key) == {str(disliked), str(deep)}
    assert 0 < redis.ttl(key) <= settings.negative_feedback_ttl_seconds
    assert keys_without_ttl(redis, keys) == [] and live_problems(redis, keys) == []


def test_a_dislike_posted_during_a_publish_stays_filtered_after_the_switch(
    published: dict, settings: Settings, client: TestClient
):
    user_id = _live_user(settings)
    disliked = _stored(settings, user_id)["recommended_products"][0]
    # the next version was built before the dislike: its data ends before it
    assert datetime.fromisoformat(published["data_end"]) < datetime.now(UTC)
    client.post(f"/users/{user_id}/events", json={"product_id": disliked, "event_type": "not_interested"})
    matrix_dir = Path(published["matrix_dir"])
    newer = publish(
        settings, matrix_dir, Path(published["model_path"]).parent, matrix_dir.parent / "eval" / "report.json",
        PipelineParams.from_dict({**published["params"], "top_n": 12}),
    )
    assert newer.version != published["version"]
    assert disliked in _stored(settings, user_id)["recommended_products"]  # the new version lists it again ...
    # the API sees the switch within a second (it caches the live pointer that long) ...
    test_api._until(lambda: client.get(f"/users/{user_id}/recommendations").json()["version"] == newer.version, 5)
    for name, products in _every_view(client, user_id).items():  # ... and no page shows it
        assert disliked not in products, name


def test_a_new_user_with_only_negative_feedback_gets_top_buys_without_it(published: dict, client: TestClient):
    top = client.get("/top-buys", params={"n": 3}).json()["top_buys"]
    response = client.post("/users/900101/events", json={"product_id": top[0], "event_type": "return"})
    assert response.status_code == 201, response.text
    body = client.get("/users/900101/recommendations", params={"n": 3}).json()
    assert body["source"] == "popular" and body["recommended_products"] == [*top[1:], body["recommended_products"][-1]]
    assert top[0] not in body["recommended_products"]


def test_a_fold_in_user_never_gets_a_product_back_after_saying_no(published: dict, client: TestClient):
    top = client.get("/top-buys", params={"n": 2}).json()["top_buys"]
    for product, event_type in zip(top, ("view", "add_to_cart"), strict=True):
        client.post("/users/900102/events", json={"product_id": product, "event_type": event_type})
    shown = client.get("/users/900102/recommendations", params={"n": 30}).json()["recommended_products"]
    disliked = next(product for product in shown if product not in top)  # a view leaves its product listable
    client.post("/users/900102/events", json={"product_id": disliked, "event_type": "dislike"})
    body = client.get("/users/900102/recommendations", params={"n": 30}).json()
    assert body["source"] == "fold_in" and disliked not in body["recommended_products"]


def test_an_event_type_neither_weighted_nor_negative_is_refused_naming_the_known_ones(published: dict, client: TestClient):
    product = client.get("/top-buys", params={"n": 1}).json()["top_buys"][0]
    response = client.post("/users/900103/events", json={"product_id": product, "event_type": "meh"})
    assert response.status_code == 422
    assert response.json()["detail"] == (
        "event_type 'meh' is neither weighted nor negative feedback in the live version; use one of: "
        "add_to_cart, dislike, not_interested, purchase, rating, return, view"
    )


def test_fold_in_weighs_negative_feedback_as_a_block_that_cancels_the_pair(published: dict, settings: Settings):
    live = load_live_model(live_meta(*connect(settings)), settings)
    bought, returned, disliked = live.item_ids[:3]
    now = datetime.now(UTC).timestamp()
    events = [
        (bought, "purchase", 1.0, now), (returned, "purchase", 1.0, now), (returned, "return", None, now),
        (disliked, "dislike", None, now), ("not-in-the-model", "dislike", None, now),
    ]
    weighed = weigh_events(live, events, datetime.now(UTC))
    assert weighed.row.indices.tolist() == [0]  # only the purchase kept: the return cancels its purchase
    assert np.array_equal(weighed.owned, [0, 1, 2])
    assert weighed.negative_products == {returned, disliked, "not-in-the-model"}
