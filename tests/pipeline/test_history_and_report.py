"""The quality history in PostgreSQL (recsys_runs) and the run's HTML evaluation report."""

from __future__ import annotations

import html
import json
import re
from datetime import timedelta

import pytest

from recsys.core import db
from recsys.core.errors import InputError, QualityGateError, StaleVersionError
from recsys.core.layout import EVALUATION_HTML
from recsys.core.params import PipelineParams
from recsys.pipeline import history
from recsys.pipeline.stages import plan_run, publish_stage, run_pipeline


def test_a_refused_then_a_published_run_are_both_in_the_history(settings, demo_loaded, window_end):
    with pytest.raises(QualityGateError):
        run_pipeline(settings, window_end - timedelta(days=1), PipelineParams(min_lift=50.0))
    published = run_pipeline(settings, window_end, PipelineParams())

    newest, refused = history.recent_runs(settings, limit=5)
    assert refused["status"] == history.REFUSED and refused["gate_passed"] is False
    assert refused["gate_reason"].startswith("refused: model MAP@10")
    assert refused["published_version"] is None and refused["params"]["min_lift"] == 50.0

    assert newest["status"] == history.PUBLISHED and newest["gate_passed"] is True
    assert newest["published_version"] == published.publish.version
    assert newest["run_key"] == published.run.paths.key and newest["window_end"] == window_end
    assert newest["metrics"]["model"]["map"] == pytest.approx(published.evaluation.model.map)
    assert newest["metrics"]["popularity"]["map"] == pytest.approx(published.evaluation.popularity.map)
    counts = newest["extract_counts"]
    assert counts["rows_read"] == published.extract.rows_read and counts["rows_kept"] == published.extract.rows_kept
    assert newest["users"] == published.matrix.n_users and newest["items"] == published.matrix.n_items
    assert newest["interactions"] > newest["users"] and newest["train_seconds"] > 0

    # an older run published afterwards is refused as stale and recorded as skipped
    older = plan_run(settings, window_end - timedelta(days=1), PipelineParams(min_lift=50.0))
    with pytest.raises(StaleVersionError):
        publish_stage(settings, older)
    assert history.recent_runs(settings, limit=5)[1]["status"] == history.SKIPPED_STALE


def test_the_html_report_is_self_contained_and_shows_the_history(settings, demo_loaded, window_end):
    for days_back in (2, 1, 0):
        result = run_pipeline(settings, window_end - timedelta(days=days_back), PipelineParams())
    page = (result.run.paths.evaluation / EVALUATION_HTML).read_text()
    assert not re.search(r"(src|href)=\"?https?:", page), "the page must open without a network"
    assert page.count("<svg") == 6  # metrics, history, popularity bias, categories, data quality, size
    assert "Quality history: the last 3 runs" in page
    assert f"quality gate {html.escape(result.evaluation.reason)}" in page
    report = json.loads(result.evaluation.report_path.read_text())
    curve = report["distribution"]["model"]["top_popular_share"]
    assert curve["100"] == pytest.approx(1.0)
    assert 0 < curve["1"] <= curve["10"] <= curve["50"] <= 1
    # popularity recommends only the most popular products: more of its list is in the top 10 %
    assert report["distribution"]["popularity"]["top_popular_share"]["10"] >= curve["10"]
    shares = report["distribution"]["model"]["category_share"]
    assert sum(shares.values()) == pytest.approx(1.0)
    assert 1 <= report["distribution"]["model"]["mean_distinct_categories"] <= report["k"]


def test_evaluate_and_publish_hold_blas_to_one_thread(settings, demo_loaded, window_end, monkeypatch):
    import warnings

    import implicit.utils
    from threadpoolctl import threadpool_info

    from recsys.pipeline import stages

    run = plan_run(settings, window_end, PipelineParams())
    stages.extract_stage(settings, run)
    stages.matrix_stage(settings, run)
    stages.train_stage(settings, run)
    assert any(api["user_api"] == "blas" and api["num_threads"] > 1 for api in threadpool_info()), (
        "this machine's BLAS is single-threaded: the test would pass without the limit"
    )
    monkeypatch.setattr(implicit.utils, "_checked_blas_config", False)  # implicit warns once per process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stages.evaluate_stage(settings, run)
        monkeypatch.setattr(implicit.utils, "_checked_blas_config", False)
        stages.publish_stage(settings, run)
    assert [str(w.message) for w in caught if "threads" in str(w.message)] == []


def test_a_database_from_before_the_history_says_to_run_init_db(settings, demo_loaded, window_end):
    """An upgraded deployment whose schema predates recsys_runs: a clear error, not a SQL one."""
    with db.connect(settings) as conn:
        conn.execute("DROP TABLE recsys_runs")
    with pytest.raises(InputError, match=r"no recsys_runs table .* run `recsys init-db`"):
        run_pipeline(settings, window_end, PipelineParams())
    db.create_schema(settings)  # what init-db does: the table is back, the run goes through
    assert run_pipeline(settings, window_end, PipelineParams()).publish.users > 0
