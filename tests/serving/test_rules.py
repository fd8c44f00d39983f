"""Merchandising rules end to end on real servers: added with ``recsys rules``, re-applied by the
API within its refresh interval without a new run, and in the next published version."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from helpers import REPO, published_entries
from typer.testing import CliRunner

from recsys.cli import app
from recsys.core import db
from recsys.core.errors import InputError
from recsys.core.params import PipelineParams
from recsys.core.rules import Rule, add_rule, list_rules
from recsys.core.settings import Settings
from recsys.pipeline.stages import run_pipeline
from recsys.serving.api import create_api
from recsys.serving.lookup import create_app as create_lookup_app
from recsys.serving.schemas import UserRecommendations
from recsys.storage import connect, versions

runner = CliRunner()
KEY = "rules-test-key-0123456789abcdef0123456789"
REFRESH_SECONDS = 0.2
WITHIN_A_MINUTE = 60.0


@pytest.fixture
def published(recsys_env: Settings, demo_loaded, window_end: datetime) -> Settings:
    run_pipeline(recsys_env, window_end, PipelineParams())
    return recsys_env


@pytest.fixture
def client(published: Settings) -> Iterator[TestClient]:
    settings = published.model_copy(update={"api_keys": f"write:{KEY}", "rules_refresh_seconds": REFRESH_SECONDS})
    with TestClient(create_api(settings), headers={"X-API-Key": KEY}) as test_client:
        yield test_client


def _recs(client: TestClient, user_id: str, **params) -> dict:
    answer = client.get(f"/users/{user_id}/recommendations", params=params)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _until(check: Callable[[], bool], seconds: float = WITHIN_A_MINUTE) -> float:
    """Seconds until ``check`` held; fails if it did not within ``seconds``."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < seconds, "not within the time allowed"
        time.sleep(0.05)
    return time.monotonic() - start


def _owned(settings: Settings, user_id: str) -> set[str]:
    with db.connect(settings) as conn:
        return {p for (p,) in conn.execute(
            "SELECT DISTINCT product_id FROM interactions WHERE user_id = %s AND event_type IN ('purchase', 'rating')",
            (user_id,),
        )}


def _published_lists(settings: Settings) -> dict[str, list]:
    return {user: entry["recommended_products"] for user, entry in published_entries(settings).items()}


def _a_user_and_an_unlisted_product(settings: Settings) -> tuple[str, list, str]:
    lists = _published_lists(settings)
    user_id = sorted(lists)[0]
    with db.connect(settings) as conn:
        active = [p for (p,) in conn.execute("SELECT product_id FROM products WHERE active ORDER BY product_id")]
    listed = {str(p) for p in lists[user_id]}
    unlisted = next(p for p in active if p not in listed and p not in _owned(settings, user_id))
    return user_id, lists[user_id], unlisted


def test_a_pin_and_an_exclude_from_the_cli_show_at_once_and_in_the_next_version(
    client: TestClient, published: Settings, window_end: datetime,
):
    settings = published
    user_id, stored, pinned = _a_user_and_an_unlisted_product(settings)
    excluded = stored[0]
    assert _recs(client, user_id)["recommended_products"] == stored

    for args in (["pin", "--product", pinned, "--rank", "2", "--note", "launch"], ["exclude", "--product", str(excluded)]):
        added = runner.invoke(app, ["rules", "add", *args])
        assert added.exit_code == 0, added.output
    listed = runner.invoke(app, ["rules", "list", "--json"])
    assert listed.exit_code == 0 and listed.output.count('"status": "in force"') == 2

    def served() -> list:
        return _recs(client, user_id)["recommended_products"]

    waited = _until(lambda: served()[1:2] == [int(pinned)] and excluded not in served())
    answer = _recs(client, user_id)
    # the pin changes the order the list was published with: ranked on request, same model otherwise
    assert answer["ranked_on_request"] and len(answer["recommended_products"]) == 10
    debugged = _recs(client, user_id, debug="rules")
    UserRecommendations.model_validate(debugged)  # the documented schema
    parameters = client.get("/openapi.json").json()["paths"]["/users/{user_id}/recommendations"]["get"]["parameters"]
    assert "debug" in {p["name"] for p in parameters}
    traced = debugged["rules"]
    effects = {(e["kind"], e["product_id"]): e for e in traced["applied"]}
    assert effects[("pin", int(pinned))]["rank_after"] == 2 and effects[("pin", int(pinned))]["rank_before"] is None
    assert effects[("exclude", excluded)]["effect"] == "removed" and effects[("exclude", excluded)]["rank_before"] == 1
    assert traced["in_force_fingerprint"] != traced["published_with"]
    print(f"rules served after {waited:.2f} s (refresh every {REFRESH_SECONDS} s)")

    run_pipeline(settings, window_end + timedelta(days=1), PipelineParams())
    lists = _published_lists(settings)
    assert all(excluded not in products for products in lists.values())
    pinned_everywhere = [u for u, products in lists.items() if pinned not in _owned(settings, u)]
    assert pinned_everywhere and all(lists[u][1] == int(pinned) for u in pinned_everywhere)
    # the new version was made with the rules in force: its lists are served as published
    _until(lambda: _recs(client, user_id)["version"] != traced["published_with"] and not _recs(client, user_id)["ranked_on_request"])
    assert _recs(client, user_id)["recommended_products"] == lists[user_id]


def test_inactive_and_out_of_stock_products_leave_every_list_without_a_run(client: TestClient, published: Settings):
    settings = published
    user_id, stored, _ = _a_user_and_an_unlisted_product(settings)
    gone_inactive, out_of_stock = str(stored[1]), str(stored[2])
    similar_of = str(stored[0])
    similar = client.get(f"/products/{similar_of}/similar").json()["similar_products"]
    top = client.get("/top-buys", params={"n": 20}).json()["top_buys"]
    complement = client.post("/carts/recommendations", json={"product_ids": [stored[0]]}).json()["recommended_products"][0]
    with db.connect(settings) as conn:
        conn.execute("UPDATE products SET active = false WHERE product_id = %s", (gone_inactive,))
        conn.execute("UPDATE products SET attributes = '{\"in_stock\": false}' WHERE product_id = %s", (out_of_stock,))
        conn.execute("UPDATE products SET attributes = '{\"in_stock\": false}' WHERE product_id = %s", (str(similar[0]),))
        conn.execute("UPDATE products SET attributes = '{\"in_stock\": false}' WHERE product_id = %s", (str(top[0]),))
        conn.execute("UPDATE products SET attributes = '{\"in_stock\": false}' WHERE product_id = %s", (str(complement),))
    rule = add_rule(settings, Rule("exclude", attribute="in_stock", attribute_value=False, note="out of stock"))

    hidden = {int(gone_inactive), int(out_of_stock), similar[0], top[0], complement}
    _until(lambda: not hidden & set(_recs(client, user_id)["recommended_products"]))
    answer = _recs(client, user_id)
    # exclusions do not change the order: the published list, filtered, topped up on request
    assert answer["recommended_products"][:7] == [p for p in stored if p not in hidden][:7]
    assert len(answer["recommended_products"]) == 10
    assert similar[0] not in client.get(f"/products/{similar_of}/similar").json()["similar_products"]
    assert top[0] not in client.get("/top-buys", params={"n": 20}).json()["top_buys"]
    # cart complements keep them out too
    cart = client.post("/carts/recommendations", json={"product_ids": [stored[0]], "n": 20}).json()
    assert not hidden & set(cart["recommended_products"])
    # the out-of-stock product's own page still offers alternatives
    assert client.get(f"/products/{out_of_stock}/similar").status_code == 200

    assert runner.invoke(app, ["rules", "remove", str(rule.rule_id)]).exit_code == 0
    _until(lambda: int(out_of_stock) in _recs(client, user_id)["recommended_products"])
    assert int(gone_inactive) not in _recs(client, user_id)["recommended_products"]


def test_rule_windows_segments_and_boosts(client: TestClient, published: Settings):
    settings = published
    lists = _published_lists(settings)
    vip, other = sorted(lists)[:2]
    now = datetime.now(UTC)
    with db.connect(settings) as conn:
        conn.execute("INSERT INTO user_segments (user_id, segment) VALUES (%s, 'vip')", (vip,))
    buried = lists[vip][0]
    add_rule(settings, Rule("bury", product_id=str(buried), factor=0.01, segment="vip"))
    later = add_rule(settings, Rule("exclude", product_id=str(lists[other][0]), valid_from=now + timedelta(hours=1)))
    expired = add_rule(settings, Rule("exclude", product_id=str(lists[other][1]), valid_from=now - timedelta(hours=2),
                                      valid_until=now - timedelta(hours=1)))

    _until(lambda: _recs(client, vip)["recommended_products"][0] != buried)
    traced = _recs(client, vip, debug="rules")["rules"]
    assert traced["segments"] == ["vip"]
    moved = [e for e in traced["applied"] if e["product_id"] == buried]
    assert moved and moved[0]["kind"] == "bury" and moved[0]["rank_before"] == 1
    assert (moved[0]["rank_after"] or 11) > 1
    # not in the segment, out of its window, or not yet in force: nothing changes for the other user
    assert _recs(client, other)["recommended_products"][:2] == lists[other][:2]
    status = {r.rule_id: r for r in list_rules(settings)}
    shown = runner.invoke(app, ["rules", "list"])
    assert shown.exit_code == 0 and "scheduled" in shown.output and "expired" in shown.output
    assert status[later.rule_id].valid_from > now and status[expired.rule_id].valid_until < now


def test_an_api_that_cannot_read_the_rules_applies_those_of_the_live_version(
    published: Settings, window_end: datetime, tmp_path
):
    """Started while the shop database is unreachable, the API applies the exclusions and inactive
    products the live version was published with on every path ranked on request, and says so."""
    settings = published
    lists = _published_lists(settings)
    counts: dict[str, int] = {}
    for listed in lists.values():
        for product in listed[:3]:
            counts[str(product)] = counts.get(str(product), 0) + 1
    excluded, inactive = sorted(counts, key=counts.get, reverse=True)[:2]  # the most listed products
    rule = add_rule(settings, Rule("exclude", product_id=excluded))
    with db.connect(settings) as conn:
        conn.execute("UPDATE products SET active = false WHERE product_id = %s", (inactive,))
        categories = [c for (c,) in conn.execute("SELECT DISTINCT category FROM products WHERE category IS NOT NULL")]
    run_pipeline(settings, window_end + timedelta(hours=1), PipelineParams())
    with db.connect(settings) as conn:  # back on sale: still out of everything the live version answers
        conn.execute("UPDATE products SET active = true WHERE product_id = %s", (inactive,))
    hidden = {excluded, inactive}

    from recsys.local.services import free_port

    unreachable = settings.model_copy(update={
        "database_url": f"postgresql://postgres@127.0.0.1:{free_port()}/test", "api_keys": f"write:{KEY}",
        "rules_refresh_seconds": REFRESH_SECONDS,
    })
    users = sorted(_published_lists(settings))[:15]
    with TestClient(create_api(unreachable), headers={"X-API-Key": KEY}) as client:
        answers = []
        for user_id in users:
            for params in ({"n": 30, "offset": 5}, {"diversity_lambda": 0}, {"n": 100}, {}):
                answers.append(_recs(client, user_id, **params)["recommended_products"])
        for product in list(counts)[:15]:
            similar = client.get(f"/products/{product}/similar", params={"n": 50})
            if similar.status_code == 200:
                answers.append(similar.json()["similar_products"])
        for category in [None, *categories]:
            answers.append(client.get("/top-buys", params={"n": 100, **({"category": category} if category else {})})
                           .json()["top_buys"])
        cart = client.post("/carts/recommendations", json={"product_ids": [int(p) for p in list(counts)[2:6]], "n": 100})
        answers.append(cart.json()["recommended_products"])
        health = client.get("/health/ready").json()
        traced = _recs(client, users[0], debug="rules")["rules"]

    assert len(answers) > 70
    assert not [answer for answer in answers if hidden & {str(p) for p in answer}]
    assert health["status"] == "degraded"
    assert "the shop database is unavailable" in health["detail"]
    assert "the rules the live version was published with" in health["detail"]
    assert (traced["rules_read"], traced["rules_source"]) == (False, "published")
    assert traced["in_force"] == [{"rule_id": rule.rule_id, "rule": f"exclude product {excluded}"}]

    # the rule deleted since: the published list still lacks the product, and says why
    assert runner.invoke(app, ["rules", "remove", str(rule.rule_id)]).exit_code == 0
    ok = settings.model_copy(update={"api_keys": f"write:{KEY}", "rules_refresh_seconds": REFRESH_SECONDS})
    with TestClient(create_api(ok), headers={"X-API-Key": KEY}) as client:
        _until(lambda: client.get("/health/ready").json()["status"] == "ok")
        user_id = next(u for u in users if _recs(client, u, debug="rules")["rules"]["applied"])
        traced = _recs(client, user_id, debug="rules")["rules"]
    assert traced["rules_source"] == "database"
    left_out = [e for e in traced["applied"] if str(e["product_id"]) == excluded]
    assert left_out and left_out[0]["kind"] == "excluded_at_publish" and left_out[0]["rule_id"] == rule.rule_id
    assert "no longer in force" in left_out[0]["effect"] and "pushed below" not in left_out[0]["effect"]


def test_bad_rules_get_one_line_naming_the_problem(published: Settings):
    def refused(*args: str) -> str:
        done = runner.invoke(app, ["rules", *args])
        assert done.exit_code != 0
        return str(done.exception) if done.exception and not isinstance(done.exception, SystemExit) else done.output

    assert "product 'no-such' is not in the catalogue" in refused("add", "pin", "--product", "no-such", "--rank", "1")
    assert "a boost needs a factor > 1" in refused("add", "boost", "--category", "x", "--factor", "0.5")
    # inf and 1e39 overflow float32 scores: NaN on request, an exclusion at publish
    for factor in ("inf", "1e39"):
        assert "at most 1000" in refused("add", "boost", "--product", "1", "--factor", factor)
    assert "at least 0.001" in refused("add", "bury", "--product", "1", "--factor", "1e-39")
    assert "no product of the catalogue has category 'no-such'" in refused("add", "exclude", "--category", "no-such")
    assert "no rule with id 999999" in refused("remove", "999999")
    # as a user runs it: one line on stderr, no traceback
    done = subprocess.run(
        [sys.executable, "-m", "recsys", "rules", "add", "pin", "--product", "no-such", "--rank", "1"],
        env={**os.environ}, capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == ["error: product 'no-such' is not in the catalogue (products table)"]


def test_a_stored_rule_the_checks_refuse_stops_publish_naming_it(published: Settings, window_end: datetime):
    """A rule stored before its checks existed (an infinite boost) is named, not applied."""
    settings = published
    with db.connect(settings) as conn:
        conn.execute("ALTER TABLE recommendation_rules DROP CONSTRAINT recommendation_rules_factor_check")
        (rule_id,) = conn.execute(
            "INSERT INTO recommendation_rules (kind, product_id, factor) VALUES ('boost', '1', 'Infinity') RETURNING rule_id"
        ).fetchone()
    live = versions.versions(*connect(settings))[0].version
    with pytest.raises(InputError, match=f"stored rule {rule_id} is not valid .*at most 1000, got inf.*recsys rules remove {rule_id}"):
        run_pipeline(settings, window_end + timedelta(days=1), PipelineParams())
    assert versions.versions(*connect(settings))[0].version == live


def test_the_look_up_page_explains_a_list_as_the_api_does_and_names_the_rules(client: TestClient, published: Settings):
    settings = published
    user_id, stored, _ = _a_user_and_an_unlisted_product(settings)
    rule = add_rule(settings, Rule("boost", product_id=str(stored[0]), factor=1.5))
    with TestClient(create_lookup_app(lambda: settings)) as lookup:
        why = lookup.get(f"/api/explain/{user_id}").json()
        rules = lookup.get("/api/rules").json()["rules"]
        nobody = lookup.get("/api/explain/no-such-user").json()
    api = _recs(client, user_id, explain="true")
    # the same decomposition as the API's explain=true, product by product (the API may already
    # rank on request with the boost, which can reorder the list; a product's explanation stays)
    by_product = {entry["product_id"]: entry for entry in api["explanations"]}
    shared = [entry for entry in why["explanations"] if entry["product_id"] in by_product]
    assert [entry["product_id"] for entry in why["explanations"]] == stored and why["note"] is None
    assert len(shared) >= 5 and all(entry == by_product[entry["product_id"]] for entry in shared)
    assert why["rules"][str(stored[0])] == [f"#{rule.rule_id} boost product {stored[0]} ×1.5"]
    assert why["rules"][str(stored[1])] == []
    assert [(r["rule_id"], r["status"], r["description"]) for r in rules] == [
        (rule.rule_id, "in force", f"boost product {stored[0]} ×1.5")
    ]
    assert nobody["explanations"] == [] and "top buys" in nobody["note"]


def test_publish_applies_a_segment_rule_to_its_members_only(published: Settings, window_end: datetime):
    settings = published
    lists = _published_lists(settings)
    counts: dict = {}
    for products in lists.values():
        for product in products:
            counts[product] = counts.get(product, 0) + 1
    restricted = max(counts, key=counts.get)
    holders = sorted(u for u, products in lists.items() if restricted in products)
    minors, others = holders[::2], holders[1::2]
    with db.connect(settings) as conn, conn.cursor() as cur:
        cur.executemany("INSERT INTO user_segments (user_id, segment) VALUES (%s, 'minors')", [(u,) for u in minors])
        cur.execute("UPDATE products SET attributes = '{\"age_restricted\": true}' WHERE product_id = %s", (str(restricted),))
    add_rule(settings, Rule("exclude", attribute="age_restricted", attribute_value=True, segment="minors"))

    run_pipeline(settings, window_end + timedelta(days=1), PipelineParams())
    after = _published_lists(settings)
    assert all(restricted not in after[u] for u in minors)
    # the same model still lists it for those outside the segment
    assert sum(restricted in after[u] for u in others) >= len(others) // 2


def test_a_schema_without_the_rules_table_stops_publish_with_one_line(published: Settings, window_end: datetime):
    settings = published
    with db.connect(settings) as conn:
        conn.execute("DROP TABLE recommendation_rules")
    with pytest.raises(InputError, match=r"no recommendation_rules table: run `recsys init-db`"):
        run_pipeline(settings, window_end + timedelta(days=1), PipelineParams())
    client, keys = connect(settings)
    assert versions.keys_without_ttl(client, keys) == [] and versions.live_problems(client, keys) == []
