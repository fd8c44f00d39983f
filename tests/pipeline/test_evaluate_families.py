"""Several model families in the daily pipeline on a generated shop (real PostgreSQL and Redis):
train chooses on a validation split of the pre-holdout data, evaluate gates the choice on the
holdout and reports every candidate, publish and the API serve whichever family is live."""

from __future__ import annotations

import json
from datetime import datetime

import numpy as np
import pytest
import scipy.sparse as sp
from fastapi.testclient import TestClient
from helpers import days_before, insert_interactions, live, published_entries, stage

from recsys.core.params import PipelineParams
from recsys.core.settings import Settings
from recsys.ml import selection
from recsys.ml.families import Ease, ItemKnn, load_model
from recsys.pipeline import history
from recsys.pipeline.evaluate import evaluate
from recsys.pipeline.stages import run_pipeline
from recsys.serving.api import create_api
from recsys.storage import connect
from recsys.storage.reads import live_meta

FAMILIES = ("als", "item_knn", "ease", "blend")
WRITE_KEY = "test-write-key-families-0123456789"


def api(settings: Settings) -> TestClient:
    """The API with a write key (reads and events), as a client that sends it."""
    keyed = settings.model_copy(update={"api_keys": f"write:{WRITE_KEY}"})
    return TestClient(create_api(keyed), headers={"X-API-Key": WRITE_KEY})


def test_train_keeps_the_validation_winner_and_evaluate_reports_every_candidate(settings, demo_loaded, window_end):
    params = PipelineParams(models=FAMILIES)
    paths = stage(settings, window_end, params)

    manifest = json.loads((paths.model / "manifest.json").read_text())
    families = manifest["selection"]["families"]
    assert set(families) == set(FAMILIES)
    best = max(families, key=lambda name: families[name]["validation"]["map"])
    assert manifest["model"]["family"] == best == manifest["selection"]["chosen"]["family"]
    assert load_model(paths.model / "factors_full.npz").family == best
    # every setting named, the family's defaults included (the report's "settings" column)
    assert families["ease"]["params"] == Ease().params() and families["item_knn"]["params"] == ItemKnn().params()
    assert families["blend"]["params"]["parts"][0]["params"]

    result = evaluate(paths.matrix, paths.model, paths.evaluation, params)
    report = json.loads(result.report_path.read_text())
    assert report["model_family"]["family"] == best
    assert report["selection"]["families"] == families
    assert result.model.users == result.popularity.users > 50  # the whole holdout: the choice never saw it


def test_the_validation_split_is_carved_from_each_users_own_items():
    rng = np.random.default_rng(0)
    matrix = sp.random(50, 40, density=0.3, format="csr", random_state=1, dtype=np.float32)
    matrix.data = rng.random(matrix.nnz).astype(np.float32) + 0.1

    split = selection.carve_validation(matrix, seed=3)

    assert (split.fit + split.relevant).nnz == matrix.nnz and not split.fit.multiply(split.relevant).nnz
    counts = np.diff(matrix.indptr)
    kept = np.diff(split.fit.indptr)
    np.testing.assert_array_equal(kept, np.maximum(np.floor(0.75 * counts), np.minimum(counts, 1)))
    fit_coo = split.fit.tocoo()
    np.testing.assert_array_equal(np.asarray(matrix[fit_coo.row, fit_coo.col]).ravel(), fit_coo.data)  # weights kept
    again = selection.carve_validation(matrix, seed=3)
    assert (again.relevant != split.relevant).nnz == 0


@pytest.fixture
def ease_live(settings: Settings, demo_loaded, window_end: datetime) -> dict:
    run_pipeline(settings, window_end, PipelineParams(models=("ease",)))
    return live(settings).meta()


def _ranked_on_request_similar_and_folded_in(client, settings: Settings, window_end: datetime, new_user: str) -> list:
    """What every family that folds in must serve: a published user's deeper list ranked on
    request with the published list first, similar products on request beginning with the
    published ones, and a new user's list folded in from their purchases. Returns those purchases."""
    user_id = sorted(published_entries(settings))[0]
    stored = live(settings).user_recommendations(user_id)["recommended_products"]
    deep = client.get(f"/users/{user_id}/recommendations", params={"n": 30}).json()
    assert deep.get("ranked_on_request") and deep["recommended_products"][:10] == stored, deep

    product = live(settings).top_buys()["top_buys"][0]
    similar = live(settings).similar_products(str(product))["similar_products"]
    on_request = client.get(f"/products/{product}/similar", params={"n": 25}).json()["similar_products"]
    assert on_request[: len(similar)] == similar

    bought = stored[:3]
    insert_interactions(settings, [(new_user, str(p), "purchase", 1.0, days_before(window_end, 2)) for p in bought])
    body = client.get(f"/users/{new_user}/recommendations", params={"n": 20}).json()
    assert body["source"] == "fold_in" and len(body["recommended_products"]) == 20
    assert not set(body["recommended_products"]) & set(bought)
    return bought


def test_an_ease_version_is_published_named_and_served(ease_live: dict, settings: Settings, window_end: datetime):
    assert ease_live["model_family"]["family"] == "ease"
    (row,) = history.recent_runs(settings)
    assert row["metrics"]["family"] == "ease" and set(row["metrics"]["candidates"]) == {"ease"}
    with api(settings) as client:
        assert client.get("/model").json()["model_family"]["family"] == "ease"
        bought = _ranked_on_request_similar_and_folded_in(client, settings, window_end, "900001")
        explained = client.get("/users/900001/recommendations", params={"n": 3, "explain": True}).json()
        assert len(explained["explanations"]) == 3
        for entry in explained["explanations"]:  # the terms of X·B: from the user's own past products
            assert entry["because"] and {past["product_id"] for past in entry["because"]} <= set(bought)
            assert entry["score"] == pytest.approx(sum(past["contribution"] for past in entry["because"]), abs=1e-5)


def test_a_bpr_version_serves_top_buys_to_a_user_it_cannot_fold_in(settings, demo_loaded, window_end):
    run_pipeline(settings, window_end, PipelineParams(models=("bpr",), min_lift=0.0, max_map_drop=1.0))
    meta = live_meta(*connect(settings))
    assert meta["model_family"]["family"] == "bpr"
    with api(settings) as client:
        bought = live(settings).top_buys()["top_buys"][:2]
        insert_interactions(settings, [("900002", str(p), "purchase", 1.0, days_before(window_end, 1)) for p in bought])
        body = client.get("/users/900002/recommendations").json()
        assert body["source"] == "popular" and not set(body["recommended_products"]) & set(bought)


def test_a_mult_dae_version_is_published_ranked_on_request_and_folds_in(settings, demo_loaded, window_end):
    run_pipeline(settings, window_end, PipelineParams(models=("mult_dae",), min_lift=0.0, max_map_drop=1.0))
    meta = live_meta(*connect(settings))
    assert meta["model_family"]["family"] == "mult_dae"
    with api(settings) as client:
        _ranked_on_request_similar_and_folded_in(client, settings, window_end, "900003")
