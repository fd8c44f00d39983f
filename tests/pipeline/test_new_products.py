"""New products (no interaction in the window) in what publish writes: content-based similar
products and the opt-in new-arrival slots of user lists, on a real Postgres and Redis."""

from __future__ import annotations

import json
import secrets

import pytest
from fastapi.testclient import TestClient
from helpers import days_before, insert_interactions, live, published_entries

from recsys.core import db
from recsys.core.errors import InputError
from recsys.core.params import PipelineParams
from recsys.core.rules import Rule, add_rule
from recsys.pipeline.stages import run_pipeline
from recsys.serving.api import create_api

KEY = secrets.token_urlsafe(32)

# (id, name, category, active, attributes): products no one has interacted with
NEW = [
    ("9001", "Trail Runner Pro", "books", True, {"brand": "acme", "colour": "red"}),
    ("9002", "Trail Runner Lite", "books", True, {"brand": "acme", "colour": "blue"}),
    ("9003", "Trail Runner Old", "books", False, {"brand": "acme", "colour": "red"}),  # inactive
    ("9004", "Garden Hose", "garden", True, {"brand": "hoseco"}),
    ("9005", "Rake", "garden", True, {"brand": "hoseco"}),
]
NEW_ACTIVE = {9001, 9002, 9004, 9005}


def add_new_products(settings) -> None:
    with db.connect(settings) as conn:
        for product_id, name, category, active, attributes in NEW:
            conn.execute(
                "INSERT INTO products (product_id, name, category, active, attributes) VALUES (%s, %s, %s, %s, %s)",
                (product_id, name, category, active, json.dumps(attributes)),
            )


def raw_user_lists(settings) -> dict[str, bytes]:
    """Every user's published entry as Redis holds it (the bytes, not the parsed JSON)."""
    build = live(settings)
    return {
        user_id: build.client.hget(build.keys.user_recs(build.name, user_id), user_id)
        for user_id, _ in build.entries("user_recs")
    }


def category_of(settings) -> dict[int, str]:
    with db.connect(settings) as conn:
        return {int(p): c for p, c in conn.execute("SELECT product_id, category FROM products")}


def test_a_new_product_gets_similar_products_from_its_category_and_attributes(settings, demo_loaded, window_end):
    add_new_products(settings)
    result = run_pipeline(settings, window_end, PipelineParams())
    build, categories = live(settings), category_of(settings)

    similar = build.similar_products("9001")["similar_products"]
    assert len(similar) == PipelineParams().similar_n
    # same brand and category and two name words first; the inactive twin never
    assert similar[0] == 9002 and 9003 not in similar and 9001 not in similar
    assert all(categories[p] == "books" for p in similar)
    hose = build.similar_products("9004")["similar_products"]
    assert hose[0] == 9005 and all(categories[p] == "garden" for p in hose)
    assert build.similar_products("9003") is None  # inactive: no page, no list
    # the collaborative lists are still there, and the counts include the new products' lists
    assert build.entry_counts()["similar_products"] == result.publish.products_with_similar
    with db.connect(settings) as conn:
        inactive = {int(p) for (p,) in conn.execute("SELECT product_id FROM products WHERE NOT active")}
    for product_id, entry in build.entries("similar_products"):
        assert int(product_id) not in inactive and not inactive & set(entry["similar_products"])
    assert build.bought_together("9001") is None  # nothing bought with it yet
    # the API answers the new product's page with the list publish made (the model does not know it)
    with TestClient(create_api(settings.model_copy(update={"api_keys": f"read:{KEY}"})), headers={"X-API-Key": KEY}) as api:
        answer = api.get("/products/9001/similar", params={"n": 3})
        assert answer.status_code == 200, answer.text
        assert answer.json()["similar_products"] == similar[:3] and answer.json()["product_id"] == 9001
        assert not answer.json()["ranked_on_request"]
        assert api.get("/products/9003/similar").status_code == 404  # inactive: no page


def test_without_slots_user_lists_are_what_they_were_without_new_products(settings, demo_loaded, window_end):
    run_pipeline(settings, window_end, PipelineParams())
    before = raw_user_lists(settings)
    add_new_products(settings)
    run_pipeline(settings, window_end, PipelineParams())
    assert raw_user_lists(settings) == before
    assert not any(NEW_ACTIVE & set(json.loads(raw)["recommended_products"]) for raw in before.values())


@pytest.mark.parametrize("slots", [1, 2])
def test_each_list_holds_k_new_products_in_its_last_slots(settings, demo_loaded, window_end, slots):
    add_new_products(settings)
    run_pipeline(settings, window_end, PipelineParams())
    plain = {u: e["recommended_products"] for u, e in published_entries(settings).items()}
    run_pipeline(settings, window_end, PipelineParams(new_arrival_slots=slots))
    with_slots = {u: e["recommended_products"] for u, e in published_entries(settings).items()}

    assert with_slots.keys() == plain.keys()
    top_n = PipelineParams().top_n
    for user_id, products in with_slots.items():
        assert len(products) == top_n and len(set(products)) == top_n
        assert set(products[top_n - slots :]) <= NEW_ACTIVE  # the last k slots, all new and active
        assert products[: top_n - slots] == plain[user_id][: top_n - slots]  # the rest keep their order
    # chosen per user, not one list for all: the garden lover and the book lover differ
    assert len({tuple(products[top_n - slots :]) for products in with_slots.values()}) > 1


def test_new_products_never_reach_a_user_who_has_them_blocked_or_said_no(settings, demo_loaded, window_end):
    add_new_products(settings)
    with db.connect(settings) as conn:
        users = [u for (u,) in conn.execute("SELECT DISTINCT user_id FROM interactions ORDER BY user_id LIMIT 20")]
        conn.cursor().executemany("INSERT INTO user_segments (user_id, segment) VALUES (%s, 'minors')", [(u,) for u in users[:10]])
    # 9001 and 9002 are excluded for the segment; a user of the others said no to 9004 before the window
    add_rule(settings, Rule("exclude", attribute="brand", attribute_value="acme", segment="minors"))
    disliker = users[15]
    insert_interactions(settings, [(disliker, "9004", "dislike", None, days_before(window_end, 200))])
    run_pipeline(settings, window_end, PipelineParams(new_arrival_slots=3))
    lists = {u: e["recommended_products"] for u, e in published_entries(settings).items()}

    for user_id in users[:10]:
        assert not {9001, 9002} & set(lists[user_id])
        assert set(lists[user_id][-3:]) == {9004, 9005} | (set(lists[user_id][-3:]) - NEW_ACTIVE)
    assert 9004 not in lists[disliker] and set(lists[disliker][-3:]) == {9001, 9002, 9005}
    assert any({9001, 9002} <= set(products[-3:]) for user_id, products in lists.items() if user_id not in users[:10])
    assert not any(9003 in products for products in lists.values())


def test_slots_beyond_the_list_are_refused_with_the_field_named():
    with pytest.raises(InputError, match=r"new_arrival_slots must be in \[0, top_n=5\], got 6"):
        PipelineParams(top_n=5, new_arrival_slots=6)
