"""The lookup app (``recsys.serving.lookup``) on a really published version, and the Airflow plugin
that mounts it in the api-server (``plugins/recsys_plugin.py``)."""

from __future__ import annotations

from datetime import datetime

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from helpers import insert_products, live, published_entries
from run_history import daily_runs, write_runs

from recsys.core import db
from recsys.core.params import PipelineParams
from recsys.core.settings import Settings
from recsys.local.services import free_port
from recsys.pipeline.stages import PipelineResult, run_pipeline
from recsys.serving.lookup import create_app


@pytest.fixture
def published(settings: Settings, demo_loaded, window_end: datetime) -> PipelineResult:
    return run_pipeline(settings, window_end, PipelineParams())


@pytest.fixture
def client(settings: Settings) -> TestClient:
    return TestClient(create_app(lambda: settings))


def _live_user(settings: Settings) -> str:
    return sorted(published_entries(settings))[0]


def test_user_lookup_returns_the_live_entry(published: PipelineResult, settings: Settings, client: TestClient):
    user_id = _live_user(settings)

    response = client.get(f"/api/users/{user_id}")

    assert response.status_code == 200
    expected = live(settings).user_recommendations(user_id)
    assert response.json() == {"source": "model", **expected}
    assert expected["recommended_products"]


def test_user_without_a_list_gets_the_top_buys_labelled_popular(
    published: PipelineResult, settings: Settings, client: TestClient
):
    response = client.get("/api/users/999999")

    assert response.status_code == 200
    overall = live(settings).top_buys()
    assert response.json() == {
        "user_id": "999999",
        "source": "popular",
        "recommended_products": overall["top_buys"],
    }
    assert overall["top_buys"]


def test_model_shows_version_window_and_metrics(published: PipelineResult, client: TestClient):
    response = client.get("/api/model")

    assert response.status_code == 200
    meta = response.json()
    assert meta["version"] == published.publish.version
    assert meta["data_end"] and meta["data_start"] and meta["published_at"]
    assert set(meta["metrics"]) == {"model", "popularity"}
    assert meta["metrics"]["model"]["map"] == pytest.approx(published.evaluation.model.map)
    assert meta["counts"]["users"] == published.publish.users
    assert "model_path" not in meta, "worker file paths are internal"


def test_top_buys(published: PipelineResult, settings: Settings, client: TestClient):
    everything = client.get("/api/top-buys")
    assert everything.status_code == 200
    assert everything.json() == live(settings).top_buys()

    assert client.get("/api/top-buys", params={"category": "no-such-category"}).status_code == 404


def test_top_buys_categories_are_the_published_ones(published: PipelineResult, settings: Settings, client: TestClient):
    with db.connect(settings) as conn:
        shop = {category for (category,) in conn.execute("SELECT DISTINCT category FROM products WHERE active")}

    response = client.get("/api/top-buys/categories")

    assert response.status_code == 200
    categories = response.json()["categories"]
    assert categories == sorted(categories) and set(categories) <= shop and len(categories) >= 2
    for category in categories:
        assert client.get("/api/top-buys", params={"category": category}).json()["category"] == category


def test_model_marks_params_that_differ_from_the_defaults(settings: Settings, demo_loaded, window_end: datetime):
    run_pipeline(settings, window_end, PipelineParams(factors=32, iterations=5))
    client = TestClient(create_app(lambda: settings))

    compared = {p["name"]: p for p in client.get("/api/model").json()["params_compared"]}

    assert compared["factors"] == {"name": "factors", "value": 32, "default": 64, "tuned": True}
    assert compared["iterations"]["tuned"] and compared["iterations"]["default"] == 15
    assert compared["regularization"] == {"name": "regularization", "value": 40.0, "default": 40.0, "tuned": False}
    assert not compared["event_weights"]["tuned"] and not compared["exclude_event_types"]["tuned"]
    assert {name for name, p in compared.items() if p["tuned"]} == {"factors", "iterations"}


def test_product_labels_come_from_the_shop_catalogue(settings: Settings, client: TestClient):
    insert_products(settings, [("p/1", "Tea <b>pot</b>", "kitchen", True), ("2", "Spade", None, False)])

    response = client.get("/api/products", params={"ids": ["p/1", "2", "unknown"]})

    assert response.status_code == 200
    assert response.json() == {
        "products": {"p/1": {"name": "Tea <b>pot</b>", "category": "kitchen"}, "2": {"name": "Spade", "category": None}}
    }


def test_product_labels_with_the_database_down_are_503_without_its_address(settings: Settings):
    port = free_port()
    # built anew, not model_copy: the copy would keep the cached require_database_url
    down = Settings(_env_file=None, database_url=f"postgresql://postgres@127.0.0.1:{port}/shop", redis_url=settings.redis_url)
    client = TestClient(create_app(lambda: down))

    response = client.get("/api/products", params={"ids": ["1"]})

    assert response.status_code == 503
    assert response.json() == {"detail": "Shop database unavailable; see the API server log."}
    assert str(port) not in response.text


def test_runs_before_the_history_table_exists_are_unavailable(settings: Settings, client: TestClient):
    with db.connect(settings) as conn:  # a shop database from before the table (no init-db since)
        conn.execute("DROP TABLE recsys_runs")
    response = client.get("/api/runs")

    assert response.status_code == 200
    assert response.json() == {"available": False, "runs": []}


def test_runs_are_the_latest_ones_oldest_first(settings: Settings, client: TestClient, window_end: datetime):
    write_runs(settings, daily_runs(window_end, [0.10, 0.12, 0.08, 0.15], [0.09, 0.09, 0.09, 0.09]))

    response = client.get("/api/runs", params={"limit": 3})

    assert response.status_code == 200
    found = response.json()
    assert found["available"]
    assert [run["metrics"]["model"]["map"] for run in found["runs"]] == [0.12, 0.08, 0.15]
    assert [run["gate_passed"] for run in found["runs"]] == [True, False, True]
    assert datetime.fromisoformat(found["runs"][-1]["window_end"]) == window_end


def test_runs_carry_columns_the_pipeline_adds_later(settings: Settings, client: TestClient, window_end: datetime):
    """Rows come whole, so a report column added to recsys_runs reaches the page's report link."""
    write_runs(settings, daily_runs(window_end, [0.10], [0.09]))
    with db.connect(settings) as conn:
        conn.execute("ALTER TABLE recsys_runs ADD COLUMN report TEXT")
        conn.execute("UPDATE recsys_runs SET report = 'https://reports.example.org/runs/1'")

    [run] = client.get("/api/runs").json()["runs"]

    assert run["report"] == "https://reports.example.org/runs/1"


def test_nothing_published_is_404_not_an_error(client: TestClient):
    for path in ("/api/model", "/api/users/1", "/api/top-buys"):
        response = client.get(path)
        assert response.status_code == 404
        assert "no version published yet" in response.json()["detail"]


def test_page_is_a_self_contained_form(client: TestClient):
    response = client.get("/")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "<form" in page
    # user input and Redis values only ever reach the DOM as text
    assert "innerHTML" not in page
    assert "http://" not in page and "https://" not in page, "no external assets"


def test_unreachable_redis_is_503_without_its_address(settings: Settings):
    port = free_port()
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{port}/0"})
    client = TestClient(create_app(lambda: down), raise_server_exceptions=False)

    for path in ("/api/model", "/api/users/1", "/api/top-buys"):
        response = client.get(path)
        assert response.status_code == 503
        assert response.json() == {"detail": "Redis is unavailable; try again later"}
        assert str(port) not in response.text and "127.0.0.1" not in response.text


def test_unconfigured_redis_is_503():
    client = TestClient(create_app(lambda: Settings(_env_file=None)), raise_server_exceptions=False)

    response = client.get("/api/model")

    assert response.status_code == 503
    assert "RECSYS_REDIS_URL" in response.json()["detail"]


# --- the Airflow plugin ---------------------------------------------------------------------


def _recsys_plugin_app() -> dict:
    from airflow import plugins_manager

    apps, _ = plugins_manager.get_fastapi_plugins()
    return next(app for app in apps if app["url_prefix"] == "/recsys")


def test_airflow_discovers_the_plugin():
    from airflow import plugins_manager

    [info] = [plugin for plugin in plugins_manager.get_plugin_info() if plugin["name"] == "recsys"]

    assert not [source for source in plugins_manager.get_import_errors() if "recsys_plugin" in source]
    assert info["fastapi_apps"] == [{"app": "recsys_plugin.LazyLookupApp", "url_prefix": "/recsys", "name": "Recsys"}]
    [view] = info["external_views"]
    assert view["href"] == "recsys/" and view["destination"] == "nav" and view["url_route"] == "recsys"


def test_plugin_app_requires_an_airflow_login():
    client = TestClient(_recsys_plugin_app()["app"])

    assert client.get("/api/model").status_code == 401
    assert client.get("/").status_code == 401


@pytest.mark.parametrize("via_connection", [True, False], ids=["recsys-connections", "RECSYS-env"])
def test_plugin_app_serves_the_live_version_to_a_logged_in_user(
    via_connection: bool, airflow_db, published: PipelineResult, recsys_env: Settings, monkeypatch: pytest.MonkeyPatch
):
    """Redis and the shop database come from the ``recsys_redis`` / ``recsys_db`` connections
    when they exist (winning over RECSYS_REDIS_URL / RECSYS_DATABASE_URL), else from those."""
    from airflow.api_fastapi.app import init_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    if via_connection:
        monkeypatch.setenv("AIRFLOW_CONN_RECSYS_REDIS", recsys_env.redis_url)
        monkeypatch.setenv("RECSYS_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
        monkeypatch.setenv("AIRFLOW_CONN_RECSYS_DB", recsys_env.database_url)
        monkeypatch.setenv("RECSYS_DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/shop")
    token = init_auth_manager().generate_jwt(SimpleAuthManagerUser(username="viewer", role="viewer"))
    # the Airflow UI's session cookie: the page in the UI's iframe is same-origin
    client = TestClient(_recsys_plugin_app()["app"], cookies={"_token": token})

    response = client.get("/api/model")

    assert response.status_code == 200
    assert response.json()["version"] == published.publish.version
    with db.connect(recsys_env) as conn:
        [(product_id, name)] = conn.execute("SELECT product_id, name FROM products ORDER BY product_id LIMIT 1")
    labels = client.get("/api/products", params={"ids": [product_id]})
    assert labels.status_code == 200
    assert labels.json()["products"][product_id]["name"] == name


def test_plugin_app_is_mounted_under_recsys_in_the_api_server():
    """The api-server mounts plugin apps by url_prefix; a reserved prefix would be skipped."""
    from airflow.api_fastapi.app import RESERVED_URL_PREFIXES, init_plugins

    app = FastAPI()
    init_plugins(app)

    assert not any("/recsys".startswith(prefix) for prefix in RESERVED_URL_PREFIXES)
    assert "/recsys" in [getattr(route, "path", None) for route in app.routes]


def test_the_page_links_and_serves_the_live_versions_evaluation_report(published: PipelineResult, client: TestClient):
    link = client.get("/api/model").json()["report"]
    assert link is not None and link.endswith("/report")
    report = client.get("/report")
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert "<svg" in report.text and published.publish.version.split("-")[0][:8] in report.text
