"""The look-up page in a real headless Chromium, served by uvicorn against real Redis and Postgres
with a published version and a run history. Screenshots (light and dark) go to pytest's tmp path.

Chromium comes from the machine (Debian's ``/usr/bin/chromium``): ``playwright install`` would
download a browser build, which this project's machines cannot. Without either, the test skips.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from helpers import insert_products, live, published_entries, served_in_thread, simulated_experiment
from run_history import daily_runs, write_runs

from recsys.core import db
from recsys.core.layout import published_report
from recsys.core.params import PipelineParams
from recsys.core.rules import Rule, add_rule
from recsys.core.settings import Settings
from recsys.local.services import free_port
from recsys.pipeline.experiments import report
from recsys.pipeline.stages import run_pipeline
from recsys.serving.lookup import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MODEL_MAPS = [0.071, 0.083, 0.052, 0.090, 0.094]
POPULARITY_MAPS = [0.060, 0.061, 0.063, 0.062, 0.064]

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian package chromium)", allow_module_level=True)


@pytest.fixture
def served(settings: Settings, demo_loaded, window_end: datetime) -> Iterator[str]:
    """A tuned version live, a product name that is markup, a run history; the page under uvicorn."""
    run_pipeline(settings, window_end, PipelineParams(factors=32, family_params={"ease": {"regularization": 500.0}}))
    first_top_buy = live(settings).top_buys()["top_buys"][0]
    with db.connect(settings) as conn:
        [(category,)] = conn.execute("SELECT category FROM products WHERE product_id = %s", (str(first_top_buy),))
    insert_products(settings, [(str(first_top_buy), "<img src=x onerror=alert(1)>", category, True)])
    write_runs(settings, daily_runs(window_end, MODEL_MAPS, POPULARITY_MAPS))
    with served_in_thread(create_app(lambda: settings)) as url:
        yield url + "/"


@pytest.fixture
def browser() -> Iterator:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _names(settings: Settings, product_ids: list) -> dict[str, str]:
    with db.connect(settings) as conn:
        rows = conn.execute(
            "SELECT product_id, name FROM products WHERE product_id = ANY(%s)", ([str(p) for p in product_ids],)
        )
        return dict(rows.fetchall())


def _look_up(page, user_id: str) -> None:
    page.fill("#user-id", user_id)
    page.click("button[type=submit]")
    page.wait_for_selector("#user-source")
    page.wait_for_selector("#user-result tbody tr")


@pytest.mark.parametrize("color_scheme", ["light", "dark"])
def test_page_shows_names_fallback_params_and_chart(
    color_scheme: str, served: str, settings: Settings, browser, tmp_path: Path
):
    build = live(settings)
    user_id = sorted(published_entries(settings))[0]
    recommended = build.user_recommendations(user_id)["recommended_products"]
    overall = build.top_buys()["top_buys"]
    page = browser.new_page(color_scheme=color_scheme, viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: errors.append(f"dialog: {dialog.message}"))

    page.goto(served)
    page.wait_for_selector("#quality-chart polyline.model")
    page.wait_for_selector("#model table")

    # a known user: their list, best first, with names from the catalogue, why, and the rules
    boosted = add_rule(settings, Rule("boost", product_id=str(recommended[0]), factor=2.0, note="promo"))
    _look_up(page, user_id)
    assert "source: model" in page.inner_text("#user-source")
    rows = page.locator("#user-result tbody tr")
    assert rows.count() == len(recommended)
    names = _names(settings, recommended)
    page.wait_for_function("() => document.querySelectorAll('#user-result thead th').length === 6")
    for rank, product_id in enumerate(recommended):
        cells = rows.nth(rank).locator("td").all_inner_texts()
        assert cells[:3] == [str(rank + 1), str(product_id), names[str(product_id)]]
        assert cells[4].startswith("because of "), cells  # views and carts count too, not only purchases
    assert rows.nth(0).locator("td").nth(5).inner_text() == f"#{boosted.rule_id} boost product {recommended[0]} ×2"
    page.screenshot(path=tmp_path / f"lookup-known-{color_scheme}.png", full_page=True)
    page.reload()
    page.wait_for_selector("#rules tbody tr")
    assert "boost product" in page.inner_text("#rules") and "in force" in page.inner_text("#rules")

    # an unknown user: the top buys overall, labelled as the popular fallback
    _look_up(page, "no-such-user")
    assert "source: popular" in page.inner_text("#user-source")
    assert "popular fallback" in page.inner_text("#user-source")
    assert page.locator("#user-result tbody tr td:nth-child(2)").all_inner_texts() == [str(p) for p in overall]
    # a name that is markup stays text: no element made of it, no alert
    assert page.locator("#user-result tbody tr").first.locator("td").nth(2).inner_text() == "<img src=x onerror=alert(1)>"
    assert page.locator("#user-result img").count() == 0

    # top buys by category: every published category offered, the list follows the choice
    categories = page.locator("#category option").all_inner_texts()[1:]
    assert len(categories) >= 2
    page.select_option("#category", categories[-1])
    expected = build.top_buys(categories[-1])["top_buys"]
    page.wait_for_function(
        "first => document.querySelector('#top-buys tbody tr td:nth-child(2)')?.textContent === first",
        arg=str(expected[0]),
    )

    # params: the tuned one marked, a default one not; metrics with 4 decimals, counts with separators
    factors = page.locator("#model tr", has_text="factors").first.inner_text()
    assert "32" in factors and "64" in factors and "tuned/overridden" in factors
    (regularization,) = [row for row in page.locator("#model tr").all_inner_texts() if row.startswith("regularization\t")]
    assert "tuned/overridden" not in regularization
    # nested settings spelled out, an empty list as a dash (both were blank or "[object Object]")
    assert "ease (regularization 500)" in page.locator("#model tr", has_text="family_params").first.inner_text()
    metric_rows = page.locator("#model table").nth(0).locator("tr", has_text="@10")
    metric_cells = metric_rows.locator("td.num").all_inner_texts()
    assert metric_cells and all(len(cell.split(".")[1]) == 4 for cell in metric_cells)
    assert "MAP@10" in page.inner_text("#model")
    assert page.locator("#model dt").nth(1).inner_text() == "Model"
    assert page.locator("#model dd").nth(1).inner_text() == "als"  # the family the live version was made with
    evaluated_users = page.locator("#model tr", has_text="Evaluated users").first.locator("td.num").first.inner_text()
    assert evaluated_users.isdigit() or "," in evaluated_users, "a count, not a 4-decimal metric"

    # the chart: one point per run for each series, the refused run marked, visible
    assert page.is_visible("#quality-chart")
    assert page.locator("#quality-chart circle.model").count() == len(MODEL_MAPS)
    assert page.locator("#quality-chart circle.popularity").count() == len(POPULARITY_MAPS)
    assert page.locator("#quality-chart circle.refused").count() == 1
    assert page.locator("#quality-chart").bounding_box()["height"] > 150
    assert "1 refused by the quality gate" in page.inner_text("#history")

    page.screenshot(path=tmp_path / f"lookup-fallback-{color_scheme}.png", full_page=True)
    assert not errors
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == ("rgb(255, 255, 255)" if color_scheme == "light" else "rgb(17, 24, 39)")


def _rate(estimate: dict) -> str:
    return f"{estimate['value']:.4f} [{estimate['low']:.4f}, {estimate['high']:.4f}]"


def _lift(lift: dict) -> str:
    def share(value: float) -> str:
        return f"{value * 100:+.1f}%"

    return f"{share(lift['value'])} [{share(lift['low'])}, {share(lift['high'])}]" + (" *" if lift["significant"] else "")


def test_page_shows_the_running_experiment_as_the_analysis_computes_it(
    served: str, settings: Settings, browser, tmp_path: Path
):
    """Simulated shoppers (those of `recsys bench abtest`, +30 % click-through planted in the
    treatment): the page's numbers are the analysis' own, and a looked-up user's variant is the
    one the assignment gives."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(served)
    page.wait_for_selector("#experiment p:has-text('No experiment yet')")

    experiment = simulated_experiment(settings, "diversity", lift=0.3)
    page.reload()
    page.wait_for_selector("#experiment-variants tbody tr")
    result = report(settings, "diversity", act=False)
    rows = page.locator("#experiment-variants tbody tr")
    assert rows.count() == 2
    for index, variant in enumerate(result["variants"]):
        cells = rows.nth(index).locator("td").all_inner_texts()
        lifts = variant["lift"]
        assert cells == [
            variant["name"], "50 %", "serving",
            f"{variant['exposed_users']:,}", f"{variant['lists']:,}",
            _rate(variant["click_through"]), _lift(lifts["click_through"]) if lifts else "control",
            _rate(variant["conversion"]), _lift(lifts["conversion"]) if lifts else "control",
        ]
    assert "running" in page.inner_text("#experiment p") and "diversity" in page.inner_text("#experiment p")
    p_value = result["srm"]["p_value"]
    shown = page.inner_text("#experiment-srm")
    assert shown == f"Sample ratio: p = {page.evaluate('p => p.toPrecision(3)', p_value)} (as configured)"
    assert float(shown.split()[4]) == pytest.approx(p_value, rel=5e-3)
    guardrail = page.locator("#experiment-guardrails tbody tr").first.locator("td").all_inner_texts()
    assert guardrail == ["click-through", "treatment", "0.0 %", _lift(result["guardrails"][0]["lift"]), "keep"]

    # a looked-up user: their variant now (the assignment's), for a user with a list and one without
    for user_id in (sorted(published_entries(settings))[0], "u7"):
        assignment = experiment.assign(user_id, datetime.now(experiment.starts_at.tzinfo))
        _look_up(page, user_id)
        said = page.inner_text("#user-variant")
        expected = f"variant {assignment.variant}." if assignment.enrolled else "not enrolled (gets the control, control"
        assert said.startswith("Experiment diversity (running): ") and expected in said, said
    page.screenshot(path=tmp_path / "lookup-experiment.png", full_page=True)


def test_page_shows_ids_only_when_the_shop_database_is_down(served: str, settings: Settings, browser, tmp_path: Path):
    """The same page with an unreachable database: ids, a note instead of names, no chart."""
    down = Settings(
        _env_file=None,
        database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/shop",
        redis_url=settings.redis_url,
        redis_prefix=settings.redis_prefix,
    )
    with served_in_thread(create_app(lambda: down)) as url:
        page = browser.new_page()
        page.goto(f"{url}/")
        _look_up(page, "no-such-user")
        assert "popular fallback" in page.inner_text("#user-source")
        assert "Names unavailable" in page.inner_text("#user-result")
        assert page.locator("#user-result tbody tr td:nth-child(3)").all_inner_texts()[0] == "—"
        page.wait_for_selector("#history p:has-text('Run history unavailable')")
        assert not page.is_visible("#quality-chart")
        page.screenshot(path=tmp_path / "lookup-database-down.png", full_page=True)


def test_report_named_in_the_meta_is_a_link_only_when_it_is_a_web_url(served: str, settings: Settings, browser):
    build = live(settings)
    meta_key = build.keys.meta(build.name)
    page = browser.new_page()
    # without a report of its own on this host, the page falls back to what the meta names
    published_report(settings, build.meta()).unlink()

    build.client.hset(meta_key, "report", "javascript:alert(1)")
    page.goto(served)
    page.wait_for_selector("#report span")
    assert page.locator("#report a").count() == 0
    assert page.inner_text("#report") == "Latest run report: javascript:alert(1)"

    build.client.hset(meta_key, "report", "https://reports.example.org/runs/1")
    page.goto(served)
    page.wait_for_selector("#report a")
    assert page.get_attribute("#report a", "href") == "https://reports.example.org/runs/1"
    assert page.inner_text("#report a") == "Latest run report"
