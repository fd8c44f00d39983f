"""The quality history in PostgreSQL (recsys_runs) and the run's HTML evaluation report."""

from __future__ import annotations

import html
import json
import logging
import re
import subprocess
import sys
from datetime import timedelta

import pytest

from recsys.core import db
from recsys.core.errors import InputError, QualityGateError, StaleVersionError
from recsys.core.layout import EVALUATION_HTML, PUBLISHED, PUBLISHED_MARKER
from recsys.core.params import PipelineParams
from recsys.pipeline import history, report
from recsys.pipeline.stages import (
    chosen_version_blocker,
    evaluate_stage,
    extract_stage,
    finish_publish_stage,
    matrix_stage,
    plan_run,
    prepare_publish_stage,
    publish_shard_stage,
    publish_stage,
    record_failed_publish,
    run_pipeline,
    switched_by,
    train_stage,
)


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


def test_a_fresh_process_holds_every_blas_to_one_thread_while_scoring():
    """An Airflow task is a fresh process: implicit, imported inside the BLAS limit, loads scipy's own
    OpenBLAS then. The limit must reach it too, or implicit warns (RuntimeWarning) in evaluate,
    prepare_publish and publish_shard, and scoring oversubscribes the cores."""
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "from threadpoolctl import threadpool_info\n"
        "from recsys.pipeline.stages import _one_blas_thread\n"
        "with _one_blas_thread():\n"
        "    from implicit.cpu.als import AlternatingLeastSquares\n"
        "    AlternatingLeastSquares(factors=4)\n"
        "    print(sorted({api['num_threads'] for api in threadpool_info() if api['user_api'] == 'blas'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[1]"


def _evaluated(settings, window_end, *dag_run_ids):
    run = plan_run(settings, window_end, PipelineParams())
    extract_stage(settings, run)
    matrix_stage(settings, run)
    train_stage(settings, run)
    for dag_run_id in dag_run_ids:
        evaluate_stage(settings, run, dag_run_id=dag_run_id)
    return run


def _rows_by_dag_run(settings) -> dict:
    return {row["dag_run_id"]: row for row in history.recent_runs(settings)}


def test_two_dag_runs_of_one_run_folder_keep_their_own_outcomes(settings, demo_loaded, window_end):
    """A manual run and a backfill of the same day and params share a run folder: each publish sets
    the outcome on its own DAG run's row, not on whichever row was recorded last."""
    run = _evaluated(settings, window_end, "manual__a", "backfill__b")

    version = publish_stage(settings, run, dag_run_id="manual__a").version
    rows = _rows_by_dag_run(settings)
    assert (rows["manual__a"]["status"], rows["manual__a"]["published_version"]) == (history.PUBLISHED, version)
    assert (rows["backfill__b"]["status"], rows["backfill__b"]["published_version"]) == (history.EVALUATED, None)

    publish_stage(settings, run, dag_run_id="backfill__b")
    assert {row["status"] for row in _rows_by_dag_run(settings).values()} == {history.PUBLISHED}


def test_a_publish_retried_after_its_switch_records_it_without_staging_again(settings, demo_loaded, window_end, caplog):
    """The publish task switched its version live, then was killed before Airflow recorded success:
    the retry finds its own switch, records the run as published and stages nothing again."""
    run = _evaluated(settings, window_end, "manual__a")
    _, attempt = prepare_publish_stage(settings, run, "manual__a")
    shard = publish_shard_stage(settings, run, attempt, 0, 1)
    first = finish_publish_stage(settings, run, attempt, [shard], 1, "manual__a")
    history.record_publish(settings, run.paths.key, history.EVALUATED, dag_run_id="manual__a")  # as if killed
    assert switched_by(settings, "another-attempt") is None

    caplog.clear()
    again = finish_publish_stage(settings, run, attempt, [shard], 1, "manual__a")

    assert again == first == switched_by(settings, attempt).result
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    row = _rows_by_dag_run(settings)["manual__a"]
    assert (row["status"], row["published_version"]) == (history.PUBLISHED, first.version)


def test_a_publish_outside_airflow_records_its_outcome_on_a_run_airflow_evaluated(settings, demo_loaded, window_end):
    """`recsys publish` of a run folder a DAG run evaluated (the task failed; someone published by
    hand): the outcome goes to that row, the newest of the folder, not nowhere."""
    run = _evaluated(settings, window_end, "manual__a", "backfill__b")

    version = publish_stage(settings, run, dag_run_id=None).version

    rows = _rows_by_dag_run(settings)
    assert (rows["backfill__b"]["status"], rows["backfill__b"]["published_version"]) == (history.PUBLISHED, version)
    assert rows["manual__a"]["status"] == history.EVALUATED
    # a DAG run never takes over another DAG run's row
    assert not history.record_publish(settings, run.paths.key, history.FAILED, dag_run_id="manual__zzz")


def test_a_failed_publish_task_whose_switch_went_live_leaves_the_published_marker(settings, demo_loaded, window_end):
    """The task failed after its attempt switched the version live: the history row and the run's
    published marker both say so, so `recsys republish` finds the run; another attempt's switch
    records the run as failed."""
    run = _evaluated(settings, window_end, "manual__a")
    _, attempt = prepare_publish_stage(settings, run, "manual__a")
    shard = publish_shard_stage(settings, run, attempt, 0, 1)
    result = finish_publish_stage(settings, run, attempt, [shard], 1, "manual__a")
    marker = run.paths.root / PUBLISHED / PUBLISHED_MARKER
    marker.unlink()  # as if the task had been killed between the switch and its marker
    history.record_publish(settings, run.paths.key, history.EVALUATED, dag_run_id="manual__a")

    switched = record_failed_publish(settings, run, attempt, "manual__a")

    assert switched.version == result.version
    assert json.loads(marker.read_text())["version"] == result.version
    assert json.loads(marker.read_text())["published_at"] == switched.published_at
    assert _rows_by_dag_run(settings)["manual__a"]["status"] == history.PUBLISHED
    assert record_failed_publish(settings, run, "another-attempt", "manual__a") is None
    assert _rows_by_dag_run(settings)["manual__a"]["status"] == history.FAILED


def test_a_scheduled_run_keeps_a_chosen_version_of_its_window_live(settings, demo_loaded, window_end):
    """The live version of a window, published by a manual run (or outside Airflow), blocks a
    scheduled run of the same window with other params; one published by a scheduled run does not."""
    chosen = plan_run(settings, window_end, PipelineParams(factors=32))
    default = plan_run(settings, window_end, PipelineParams())
    for run in (chosen, default):
        extract_stage(settings, run)
        matrix_stage(settings, run)
        train_stage(settings, run)
    evaluate_stage(settings, chosen, dag_run_id="manual__2026-11-28T09:12:00+00:00")
    version = publish_stage(settings, chosen, dag_run_id="manual__2026-11-28T09:12:00+00:00").version

    blocker = chosen_version_blocker(settings, default)
    assert blocker.startswith(f"the live version {version} holds this window's data")
    assert "chosen by run manual__2026-11-28T09:12:00+00:00" in blocker
    assert chosen_version_blocker(settings, chosen) is None  # its own version: a rerun publishes it again
    older = plan_run(settings, window_end - timedelta(days=1), PipelineParams())
    assert chosen_version_blocker(settings, older) is None  # the stale check's business

    history.record_publish(settings, chosen.paths.key, history.PUBLISHED, version, "manual__2026-11-28T09:12:00+00:00")
    with db.connect(settings) as conn:
        conn.execute("UPDATE recsys_runs SET dag_run_id = 'scheduled__2026-11-27T03:00:00+00:00'")
    assert chosen_version_blocker(settings, default) is None


def _history_row(window_end, recorded_at, status, model_map, popularity_map, min_lift=0.0) -> dict:
    return {
        "window_end": window_end, "recorded_at": recorded_at, "status": status, "gate_passed": status != "refused",
        "params": {"min_lift": min_lift},
        "metrics": {"model": {"map": model_map}, "popularity": {"map": popularity_map}},
    }


def test_history_plots_runs_in_date_order_with_each_runs_gate_and_outcome(window_end):
    """After a backfill the history is recorded out of date order; the plot is by window end, each
    run against its own gate, and published, refused and skipped runs look different."""
    day = timedelta(days=1)
    later = window_end + timedelta(hours=5)
    recorded = [  # recording order: today's runs first, then a backfill of the three days before
        _history_row(window_end, later, "published", 0.20, 0.10),
        _history_row(window_end, later + day / 24, "refused", 0.12, 0.10, min_lift=5.0),
        _history_row(window_end - 3 * day, later + 2 * day / 24, "skipped_stale", 0.18, 0.09),
        _history_row(window_end - 2 * day, later + 3 * day / 24, "skipped_stale", 0.19, 0.09),
        _history_row(window_end - day, later + 4 * day / 24, "skipped_stale", 0.21, 0.11),
    ]

    ordered = report.in_date_order(recorded)

    assert [row["window_end"] for row in ordered] == sorted(row["window_end"] for row in recorded)
    assert [row["status"] for row in ordered][-2:] == ["published", "refused"]  # same day: as recorded
    assert [report.run_gate(row) for row in ordered] == pytest.approx([0.09, 0.09, 0.11, 0.10, 0.60])
    plot = report.history_plot(recorded)
    for label in ("published", "refused by the gate", "not published: live data newer",
                  "gate of each run: popularity x (1 + min_lift)"):
        assert label in plot
    assert "evaluated (this run" not in plot  # only outcomes that occur get a legend entry
