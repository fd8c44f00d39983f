"""The look-up page and the run reports as a data engineer reaches them: inside the Airflow
api-server, which mounts the plugin's app at ``/recsys`` behind Airflow's login. The app is built by
Airflow's own factory (``airflow.api_fastapi.app.create_app``), once per module, and called with a
logged-in user's JWT (the UI's ``_token`` cookie); once in headless Chromium through the mounted path.

Screenshots (light and dark) go to pytest's tmp path; with ``RECSYS_TEST_SCREENSHOTS_DIR=docs/img`` they
replace the ones the docs show.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
from helpers import REPO, published_entries, served_in_thread
from run_history import backfilled_runs, write_runs

from recsys.core.params import PipelineParams
from recsys.core.settings import Settings
from recsys.pipeline.stages import PipelineResult, run_pipeline
from recsys.storage import connect
from recsys.storage.reads import live_meta

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def airflow_app(airflow_db):
    """Airflow's api-server app, plugins mounted, as ``airflow api-server`` serves it."""
    from airflow.api_fastapi.app import create_app

    return create_app()


@pytest.fixture(scope="module")
def viewer_token(airflow_app) -> str:
    """A JWT of a user with Airflow's least role, as the UI holds it after login."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="viewer", role="viewer"))


@pytest.fixture
def airflow(airflow_app, viewer_token):
    from fastapi.testclient import TestClient

    # the UI's session cookie: the page runs in the UI's iframe, same origin
    return TestClient(airflow_app, cookies={"_token": viewer_token})


@pytest.fixture
def published(recsys_env: Settings, demo_loaded, window_end: datetime) -> PipelineResult:
    return run_pipeline(recsys_env, window_end, PipelineParams())


def test_model_names_the_live_version_and_links_its_report_over_http(airflow, published: PipelineResult):
    """`GET <airflow>/recsys/api/model` under Airflow's mount (the route used request.url_for, which
    cannot see through Airflow's mount: a 500 in the UI), and the report it links, over http."""
    response = airflow.get("/recsys/api/model")

    assert response.status_code == 200, response.text
    model = response.json()
    assert model["version"] == published.publish.version
    assert model["report"] == "http://testserver/recsys/report"
    report = airflow.get(model["report"])
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert f"recsys evaluation: {published.run.paths.key}" in report.text


def test_everything_under_the_mount_needs_an_airflow_login(airflow_app, published: PipelineResult):
    from fastapi.testclient import TestClient

    anonymous = TestClient(airflow_app)
    for path in ("/recsys/", "/recsys/api/model", "/recsys/report", "/recsys/reports/manual__x", "/recsys/api/runs"):
        assert anonymous.get(path).status_code == 401, path


def test_the_evaluate_tasks_extra_link_opens_its_runs_report(
    airflow, recsys_env: Settings, demo_loaded, window_end: datetime, tmp_path: Path, monkeypatch
):
    """The link Airflow's API gives for the evaluate task leads, under the UI's base URL, to the
    report that run wrote, served from the shared artifact store (the worker's copy is gone)."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.state import DagRunState

    monkeypatch.setenv("RECSYS_ARTIFACTS_URL", (tmp_path / "store").as_uri())
    dag = DagBag(dag_folder=str(REPO / "dags")).dags["recsys_daily"]
    dag_run = dag.test(logical_date=window_end, run_conf={"min_lift": 50.0})  # a refused run: its report matters most
    assert dag_run.state == DagRunState.FAILED
    run_folder = next(recsys_env.artifacts_dir.glob("runs/*/*"))
    for report in run_folder.glob("eval/*"):
        report.unlink()  # the api-server is another host: only the store has the report

    links = airflow.get(f"/api/v2/dags/recsys_daily/dagRuns/{quote(dag_run.run_id)}/taskInstances/evaluate/links")

    assert links.status_code == 200, links.text
    link = links.json()["extra_links"]["Evaluation report"]
    assert link == f"recsys/reports/{quote(dag_run.run_id, safe='')}"  # relative to the UI's <base href>
    report = airflow.get("/" + link)
    assert report.status_code == 200, report.text
    assert "quality gate refused" in report.text
    assert airflow.get("/recsys/reports/manual__no-such-run").json() == {
        "detail": "Run 'manual__no-such-run' has recorded no evaluation (yet) in recsys_runs."
    }


def test_runs_come_in_date_order_with_their_outcome_and_report(airflow, published: PipelineResult, recsys_env, window_end):
    """A backfill recorded after later days: the history arrives by window end, each run with its
    status and, when an Airflow run recorded it, the link to its report."""
    runs = backfilled_runs(window_end, published.publish.version)
    write_runs(recsys_env, runs)

    found = airflow.get("/recsys/api/runs").json()["runs"]

    ends = [datetime.fromisoformat(run["window_end"]) for run in found]
    assert ends == sorted(ends) and len(found) == len(runs)
    assert [run["status"] for run in found][:3] == ["skipped_stale"] * 3
    assert [run["status"] for run in found].count("refused") == 1
    assert found[0]["report_url"] == "http://testserver/recsys/reports/" + quote(found[0]["dag_run_id"], safe="")


def test_a_user_id_the_shops_id_type_cannot_hold_gets_a_hint(airflow, published: PipelineResult, recsys_env):
    meta = live_meta(*connect(recsys_env))
    assert meta["id_types"]["user"] == "int"

    typo = airflow.get("/recsys/api/users/5O1").json()
    unknown = airflow.get("/recsys/api/users/999999").json()

    assert typo["source"] == unknown["source"] == "popular"
    assert "user ids are integers" in typo["hint"] and "'5O1'" in typo["hint"]
    assert "hint" not in unknown  # an integer id: simply a user without a list


# --- in headless Chromium, through the api-server's mount ----------------------------------------


@pytest.fixture(scope="module")
def airflow_url(airflow_app) -> Iterator[str]:
    """The api-server app under a real uvicorn, one per module."""
    with served_in_thread(airflow_app) as url:
        yield url


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian package chromium)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def screenshot_path(tmp_path: Path, name: str) -> Path:
    folder = os.environ.get("RECSYS_TEST_SCREENSHOTS_DIR")
    return (REPO / folder if folder else tmp_path) / name


def test_what_a_data_engineer_sees_in_the_airflow_ui(
    airflow_url: str, viewer_token: str, recsys_env: Settings, demo_loaded, window_end: datetime, browser, tmp_path: Path
):
    """A run of recsys_daily after a backfill, then in the Airflow UI (light and dark): the evaluate
    task's "Evaluation report" link opens the run's report over http; Browse > Recommendations shows
    the page in Airflow's frame; the page itself (the live model, the history in date order with each
    run's outcome and gate, a user's list, the hint for an id the shop cannot have)."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.state import DagRunState

    write_runs(recsys_env, backfilled_runs(window_end - timedelta(days=1), "v-20261127"))
    dag_run = DagBag(dag_folder=str(REPO / "dags")).dags["recsys_daily"].test(logical_date=window_end)
    assert dag_run.state == DagRunState.SUCCESS
    version = live_meta(*connect(recsys_env))["version"]
    user_id = sorted(published_entries(recsys_env))[0]
    host = airflow_url.split("//")[1].split(":")[0]

    for color_scheme in ("light", "dark"):
        context = browser.new_context(color_scheme=color_scheme, viewport={"width": 1400, "height": 900})
        context.add_cookies([{"name": "_token", "value": viewer_token, "domain": host, "path": "/"}])
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error, errors=errors: errors.append(str(error)))
        page.on("dialog", lambda dialog, errors=errors: errors.append(f"dialog: {dialog.message}"))

        # the evaluate task's details: its extra link opens the run's report, served over http
        page.goto(f"{airflow_url}/dags/recsys_daily/runs/{quote(dag_run.run_id)}/tasks/evaluate/details")
        link = page.get_by_role("link", name="Evaluation report")
        link.wait_for()
        page.screenshot(path=screenshot_path(tmp_path, f"airflow-evaluate-link-{color_scheme}.png"))
        link.click()
        page.wait_for_selector("h1:has-text('recsys evaluation')")
        assert page.url == f"{airflow_url}/recsys/reports/{quote(dag_run.run_id, safe='')}"
        assert "Quality history: the last 13 runs (by window end)" in page.content()
        if color_scheme == "light":  # the report is one static page, without a dark style
            page.screenshot(path=screenshot_path(tmp_path, "report.png"), full_page=True)

        # Browse > Recommendations: the page in the Airflow UI's frame
        page.goto(f"{airflow_url}/plugin/recsys")
        frame = page.frame_locator("iframe")
        for loaded in ("#history table", "#top-buys tbody tr", "#model table"):
            frame.locator(loaded).first.wait_for()
        assert frame.locator("#version").inner_text() == f"live: {version}"
        frame.locator("#user-id").fill(user_id)
        frame.locator("button[type=submit]").click()
        frame.locator("#user-result thead th:nth-child(6)").wait_for()  # the list with why and rules
        page.screenshot(path=screenshot_path(tmp_path, f"airflow-recommendations-{color_scheme}.png"))

        # the page itself, through the mount
        page.goto(f"{airflow_url}/recsys/")
        page.wait_for_selector("#model table")
        page.wait_for_selector("#history table")
        assert page.get_attribute("#report a", "href") == f"{airflow_url}/recsys/report"
        assert context.request.get(f"{airflow_url}/recsys/report").status == 200
        # the chart: runs in date order, each run's outcome its own mark, one line of the runs' gates
        assert page.locator("#quality-chart circle.model").count() == 13
        assert page.locator("#quality-chart circle.published").count() == 9
        assert page.locator("#quality-chart circle.refused").count() == 1
        assert page.locator("#quality-chart circle.skipped").count() == 3
        assert page.locator("#quality-chart polyline.gate").count() == 1
        rows = page.locator("#history tbody tr")  # newest first
        assert rows.first.locator("td").nth(5).inner_text() == version
        assert rows.first.locator("a").get_attribute("href") == (
            f"{airflow_url}/recsys/reports/{quote(dag_run.run_id, safe='')}"
        )
        assert rows.locator("td:nth-child(2)").all_inner_texts()[-3:] == [
            "not published: the live version holds newer data"
        ] * 3
        assert "13 runs by window end, oldest first: 9 published, 1 refused" in page.inner_text("#history")
        page.fill("#user-id", user_id)
        page.click("button[type=submit]")
        page.wait_for_function("() => document.querySelectorAll('#user-result thead th').length === 6")  # with why
        assert "source: model" in page.inner_text("#user-source")
        page.screenshot(path=screenshot_path(tmp_path, f"lookup-{color_scheme}.png"), full_page=True)

        # a user id the shop's integer ids cannot be: the fallback says why
        page.fill("#user-id", "5O1")
        page.click("button[type=submit]")
        page.wait_for_selector("#user-hint")
        assert "user ids are integers" in page.inner_text("#user-hint")
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == ("rgb(255, 255, 255)" if color_scheme == "light" else "rgb(17, 24, 39)")
        assert not errors
        context.close()
