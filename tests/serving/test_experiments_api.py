"""The API serving an experiment (docs/experiments.md): answers name the user's variant and carry
a recommendation_id, GET /users/{id}/variant agrees with what publish wrote, lists ranked on request
use the variant's params, exposures reach Postgres without a request waiting for it, and events
keep the recommendation_id they name. The live version serves the experiment as publish writes it
(tests/helpers.serve_experiment); real Redis and Postgres."""

from __future__ import annotations

import re
import secrets
import time
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from helpers import days_before, insert_interactions, live, published_entries, serve_experiment

from recsys.core import db
from recsys.core.experiments import Experiment, Variant
from recsys.core.params import PipelineParams
from recsys.core.settings import Settings
from recsys.local.services import free_port
from recsys.pipeline.stages import run_pipeline
from recsys.serving.api import create_api

KEY = secrets.token_urlsafe(32)
HEX_ID = re.compile(r"[0-9a-f]{32}")
NOW = datetime.now(UTC)
# the live version's diversity_lambda is 0.3 (PipelineParams' default): "plain" ranks in score order
EXPERIMENT = Experiment(
    "diversity",
    (Variant("control", 0.35), Variant("plain", 0.35, {"diversity_lambda": 0.0, "top_n": 12}),
     Variant("bigger", 0.2, {"factors": 16})),
    salt="experiments-api-test", starts_at=NOW - timedelta(days=1),
)


def api(settings: Settings, **changes) -> TestClient:
    configured = settings.model_copy(update={"api_keys": f"write:{KEY}", **changes})
    return TestClient(create_api(configured), headers={"X-API-Key": KEY})


@pytest.fixture
def published(settings: Settings, demo_loaded, window_end: datetime) -> None:
    run_pipeline(settings, window_end, PipelineParams())


@pytest.fixture
def enrolled(settings: Settings, published) -> dict[str, str]:
    """The live version serves EXPERIMENT; its enrolled users' variants, by user id."""
    return serve_experiment(settings, EXPERIMENT, NOW)


def exposures(settings: Settings) -> dict[str, tuple]:
    with db.connect(settings) as conn:
        rows = conn.execute(
            "SELECT recommendation_id, experiment, variant, user_id, served_at, product_ids FROM recommendation_exposures"
        ).fetchall()
    return {row[0]: row[1:] for row in rows}


def until(condition, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return result


def users_of(variant: str, count: int, start: int = 950_000) -> list[str]:
    """Users no version knows whom the hash puts in ``variant``."""
    found = []
    for number in range(start, start + 10_000):
        assigned = EXPERIMENT.assign(str(number), datetime.now(UTC))
        if assigned.enrolled and assigned.variant == variant:
            found.append(str(number))
            if len(found) == count:
                return found
    raise AssertionError(f"no {count} users of {variant}")


def test_without_an_experiment_answers_carry_nulls_and_an_id(settings: Settings, published):
    user = sorted(published_entries(settings))[0]
    with api(settings) as client:
        variant = client.get(f"/users/{user}/variant")
        answers = [client.get(f"/users/{user}/recommendations").json() for _ in range(2)]
        cold = client.get("/users/990001/recommendations").json()
    assert variant.status_code == 200
    assert variant.json() == {"user_id": int(user), "experiment": None, "variant": None, "enrolled": False}
    for body in [*answers, cold]:
        assert (body["experiment"], body["variant"]) == (None, None)
        assert HEX_ID.fullmatch(body["recommendation_id"])
    assert answers[0]["recommendation_id"] != answers[1]["recommendation_id"]
    assert exposures(settings) == {}, "no experiment: nothing to log"


def test_answers_name_the_entrys_variant_and_get_variant_agrees_with_publish(settings: Settings, enrolled):
    entries = published_entries(settings)
    assert {"control", "plain", "bigger"} <= set(enrolled.values()) and len(enrolled) < len(entries)
    ids = []
    with api(settings) as client:
        for user, entry in entries.items():
            told = client.get(f"/users/{user}/variant").json()
            body = client.get(f"/users/{user}/recommendations", params={"n": 3}).json()
            ids.append(body["recommendation_id"])
            if user in enrolled:
                assert told == {"user_id": int(user), "experiment": "diversity", "variant": enrolled[user], "enrolled": True}
                assert (body["experiment"], body["variant"]) == ("diversity", enrolled[user])
            else:
                assert told == {"user_id": int(user), "experiment": "diversity", "variant": "control", "enrolled": False}
                assert (body["experiment"], body["variant"]) == (None, None), "not enrolled: the entry names nothing"
            assert body["recommended_products"] == entry["recommended_products"][:3]
        assert client.get("/users/not-an-int/variant").status_code == 422
        assert client.get("/users/1/variant", headers={"X-API-Key": "wrong-key-0123456789"}).status_code == 401
    assert len(set(ids)) == len(ids) == len(entries) and all(HEX_ID.fullmatch(i) for i in ids)


def test_lists_ranked_on_request_use_the_variants_params(settings: Settings, enrolled, window_end: datetime):
    entries = published_entries(settings)
    products = sorted({p for entry in entries.values() for p in entry["recommended_products"]})
    control_user, plain_user = users_of("control", 1)[0], users_of("plain", 1)[0]
    # the same history for both: only their variants' params differ
    insert_interactions(settings, [
        (user, str(product), "purchase", 1.0, days_before(window_end, 3 + i))
        for user in (control_user, plain_user) for i, product in enumerate(products[:6])
    ])
    with api(settings) as client:
        def listed(user: str, **params) -> dict:
            return client.get(f"/users/{user}/recommendations", params={"n": 20, **params}).json()

        plain, control = listed(plain_user), listed(control_user)
        assert (plain["source"], plain["variant"], control["variant"]) == ("fold_in", "plain", "control")
        assert plain["recommended_products"] == listed(plain_user, diversity_lambda=0.0)["recommended_products"]
        assert control["recommended_products"] == listed(control_user, diversity_lambda=0.3)["recommended_products"]
        assert plain["recommended_products"] != control["recommended_products"], "the variants' params must differ"

        # an event: the user's list is folded in with the variant's top_n and keeps naming the variant
        posted = client.post(f"/users/{plain_user}/events", json={"product_id": products[7], "event_type": "view"})
        assert posted.status_code == 201, posted.text
        assert posted.json()["n"] == len(posted.json()["recommended_products"]) == 12
        stored = live(settings).user_recommendations(plain_user)
        assert (stored["experiment"], stored["variant"], stored["source"]) == ("diversity", "plain", "fold_in")
        again = listed(plain_user, n=12)
        assert (again["variant"], again["ranked_on_request"]) == ("plain", False)
        assert again["recommended_products"] == posted.json()["recommended_products"]


def test_a_variant_with_its_own_model_is_served_as_published(settings: Settings, enrolled):
    user = sorted(u for u, variant in enrolled.items() if variant == "bigger")[0]
    published = live(settings).user_recommendations(user)
    listed = published["recommended_products"]
    with api(settings) as client:
        deep = client.get(f"/users/{user}/recommendations", params={"n": 30}).json()
        # never re-ranked from the live version's own model: the published list, filtered
        assert (deep["ranked_on_request"], deep["recommended_products"], deep["variant"]) == (False, listed, "bigger")
        posted = client.post(f"/users/{user}/events", json={"product_id": listed[0], "event_type": "dislike"})
        assert posted.status_code == 201, posted.text
        assert posted.json()["recommended_products"] == listed[1:]
        assert live(settings).user_recommendations(user) == published, "the published entry stays"
        assert client.get(f"/users/{user}/recommendations").json()["recommended_products"] == listed[1:]


def test_exposures_of_enrolled_users_reach_postgres_as_served(settings: Settings, enrolled):
    users = sorted(enrolled)[:20]
    outside = next(u for u in sorted(published_entries(settings)) if u not in enrolled)
    cold = users_of("plain", 2, start=970_000)
    served = {}
    with api(settings, api_exposure_flush_seconds=0.05) as client:
        for user in [*users, *cold]:
            for params in ({}, {"n": 4, "offset": 3}):
                body = client.get(f"/users/{user}/recommendations", params=params).json()
                served[body["recommendation_id"]] = (user, body)
        assert client.get(f"/users/{outside}/recommendations").json()["variant"] is None
        logged = until(lambda: (found := exposures(settings)) and len(found) >= len(served) and found)
        assert client.app.service.exposures.dropped == 0
    assert set(logged) == set(served), "every list served to an enrolled user, and only those"
    for recommendation_id, (user, body) in served.items():
        experiment, variant, logged_user, served_at, product_ids = logged[recommendation_id]
        assert (experiment, variant, logged_user) == ("diversity", body["variant"], user)
        assert variant == (enrolled[user] if user in enrolled else "plain")
        assert product_ids == [str(p) for p in body["recommended_products"]], "the page as served"
        assert abs((served_at - datetime.now(UTC)).total_seconds()) < 120


def test_exposures_are_written_at_shutdown(settings: Settings, enrolled):
    user = sorted(enrolled)[0]
    with api(settings, api_exposure_flush_seconds=60) as client:
        ids = {client.get(f"/users/{user}/recommendations").json()["recommendation_id"] for _ in range(5)}
        assert exposures(settings) == {}, "not flushed yet"
    assert set(exposures(settings)) == ids


def test_postgres_down_requests_are_answered_and_drops_counted(settings: Settings, enrolled):
    users = sorted(enrolled)
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/shop"
    with api(settings, database_url=down, api_exposure_flush_seconds=0.05, api_exposure_buffer_rows=100) as client:
        log = client.app.service.exposures
        statuses = [client.get(f"/users/{users[i % len(users)]}/recommendations").status_code for i in range(150)]
        assert statuses == [200] * 150
        until(lambda: log.dropped == 50)  # the buffer holds 100: the rest are counted, not kept
        time.sleep(0.3)  # flushes keep failing: what waits is kept, nothing more is dropped
        assert (log.dropped, log.written) == (50, 0)
        # the database is back: the 100 kept rows are written by the next flush
        log.settings = settings
        until(lambda: log.written == 100)
    assert len(exposures(settings)) == 100


def test_an_event_keeps_the_recommendation_id_it_names(settings: Settings, enrolled):
    user = sorted(enrolled)[0]
    with api(settings) as client:
        body = client.get(f"/users/{user}/recommendations").json()
        product = body["recommended_products"][0]
        posted = client.post(f"/users/{user}/events", json={
            "product_id": product, "event_type": "view", "recommendation_id": body["recommendation_id"],
        })
        assert posted.status_code == 201, posted.text
        bad = client.post(f"/users/{user}/events", json={
            "product_id": product, "event_type": "view", "recommendation_id": "not-a-list-id",
        })
    assert bad.status_code == 422
    assert bad.json()["detail"].startswith("body.recommendation_id: String should match pattern") and "not-a-list-id" in bad.json()["detail"]
    with db.connect(settings) as conn:
        stored = conn.execute(
            "SELECT product_id, recommendation_id FROM interactions WHERE user_id = %s AND recommendation_id IS NOT NULL",
            (user,),
        ).fetchall()
    assert stored == [(str(product), body["recommendation_id"])]


def test_exposures_keep_ids_copy_would_misread(settings: Settings):
    from recsys.serving.exposures import ExposureLog

    tricky = ["a\\b", 'say "hi"', "{braces}", "tab\there", "two words", "", "NULL"]
    rows = [(f"{i:032x}", "e", "v", user, 1_700_000_000.5, [7, product, "x"]) for i, (user, product) in
            enumerate(zip(tricky, reversed(tricky), strict=True))]
    ExposureLog(settings)._copy(rows)
    logged = exposures(settings)
    for recommendation_id, _, _, user, served_at, products in rows:
        assert logged[recommendation_id][2] == user
        assert logged[recommendation_id][3] == datetime.fromtimestamp(served_at, UTC)
        assert logged[recommendation_id][4] == ["7", *products[1:]]
