"""The Airflow DAG: integrity, and whole runs through ``dag.test()`` against real Postgres/Redis."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from datetime import timedelta
from itertools import pairwise
from pathlib import Path
from urllib.parse import quote

import pyarrow.parquet as pq
import pytest
from helpers import REPO, simulated_experiment

from recsys.core.artifacts import open_store, pushed
from recsys.core.layout import EVALUATION, EVALUATION_HTML, EVALUATION_REPORT, EXTRACT, MATRIX, MODEL, run_paths
from recsys.core.params import PipelineParams
from recsys.core.window import window_ending
from recsys.pipeline import history
from recsys.pipeline.stages import run_pipeline
from recsys.storage import connect
from recsys.storage.reads import live_build, live_meta

TASK_ORDER = ["extract", "build_matrix", "train", "evaluate", "prepare_publish", "publish_shard", "publish"]


@pytest.fixture
def dag(airflow_db):
    """Parsed fresh per test: ``dag.test(run_conf=...)`` leaves its conf in the DAG's params."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    loaded = bag.dags["recsys_daily"]
    assert set(bag.dags) == {"recsys_daily", "recsys_tune", "recsys_after_publish"}
    for task in loaded.tasks:
        task.retries = 0  # a failing test must not wait out retry delays
    return loaded


def test_tasks_run_in_order_without_cycles(dag):
    assert sorted(dag.task_ids) == sorted([*TASK_ORDER, "analyse_experiment"])
    for upstream, downstream in pairwise(TASK_ORDER):
        assert downstream in dag.get_task(upstream).downstream_task_ids
    assert dag.get_task("extract").upstream_task_ids == set()
    assert dag.get_task("publish").downstream_task_ids == set()
    # the experiment's guardrails act before train snapshots it
    assert dag.get_task("analyse_experiment").upstream_task_ids == {"extract"}
    assert dag.get_task("analyse_experiment").downstream_task_ids == {"train"}
    order = [task.task_id for task in dag.topological_sort()]
    assert [task for task in order if task != "analyse_experiment"] == TASK_ORDER
    assert order.index("extract") < order.index("analyse_experiment") < order.index("train")


def test_schedule_is_a_real_daily_data_interval(dag):
    from airflow.sdk import CronDataIntervalTimetable

    assert isinstance(dag.timetable, CronDataIntervalTimetable)
    assert dag.catchup is False


def test_every_param_and_task_is_documented(dag):
    """The Trigger form shows each param's description, the task's Docs tab its doc_md."""
    from airflow.dag_processing.dagbag import DagBag

    tune = DagBag(dag_folder=str(REPO / "dags")).dags["recsys_tune"]
    for documented in (dag, tune):
        undocumented = [name for name in documented.params if not documented.params.get_param(name).description]
        assert undocumented == [], documented.dag_id
        assert [task.task_id for task in documented.tasks if not task.doc_md] == [], documented.dag_id


def test_params_form_covers_the_pipeline_knobs(dag):
    defaults = PipelineParams()
    for name in ("lookback_days", "factors", "regularization", "alpha", "iterations", "top_n", "k", "event_weights"):
        assert dag.params[name] == getattr(defaults, name)
    values = dict(dag.params)
    assert values.pop("use_tuned_params") is True
    assert values.pop("publish_shards") == 1
    PipelineParams.from_dict(values)  # every other Param is a pipeline parameter


def test_retry_policy_fails_bad_input_fast_and_retries_lost_connections(dag):
    import psycopg
    import redis
    from airflow.sdk import RetryAction

    from recsys.core.errors import EmptyWindowError, QualityGateError

    policy = dag.get_task("extract").retry_policy

    def decide(error: Exception) -> RetryAction:
        return policy.evaluate(error, try_number=1, max_tries=3).action

    assert decide(EmptyWindowError("empty")) == RetryAction.FAIL
    assert decide(QualityGateError("refused")) == RetryAction.FAIL
    assert decide(psycopg.OperationalError("connection refused")) == RetryAction.RETRY
    assert decide(redis.ConnectionError("reset")) == RetryAction.RETRY


def task_states(dag_run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}


def task_instance(dag_run, task_id: str):
    return next(ti for ti in dag_run.get_task_instances() if ti.task_id == task_id)


def parsed_daily():
    """recsys_daily parsed now, as a DAG processor would (after the test set RECSYS_*: its live
    asset is the one dag.test() registers), without retry delays."""
    from airflow.dag_processing.dagbag import DagBag

    loaded = DagBag(dag_folder=str(REPO / "dags")).dags["recsys_daily"]
    for task in loaded.tasks:
        task.retries = 0
    return loaded


@pytest.fixture
def fresh_dag(airflow_db, recsys_env):
    return parsed_daily()


def dag_logs(caplog, level: int = logging.INFO) -> list[str]:
    """What the DAG file's own logger (recsys.dags) said."""
    return [record.getMessage() for record in caplog.records if record.name == "recsys.dags" and record.levelno >= level]


def test_full_run_publishes_live_recommendations(fresh_dag, recsys_env, demo_loaded, window_end, caplog):
    from airflow.utils.state import DagRunState

    dag_run = fresh_dag.test(logical_date=window_end)
    assert dag_run.state == DagRunState.SUCCESS, task_states(dag_run)
    build = live_build(*connect(recsys_env))
    meta = build.meta()
    assert meta["data_end"] == window_end.isoformat()
    assert meta["counts"]["users"] == build.entry_counts()["user_recs"] > 100
    _, entry = next(build.entries("user_recs"))
    assert len(entry["recommended_products"]) > 2
    assert f"version {meta['version']} is live: {meta['counts']['users']} users" in dag_logs(caplog)
    # the evaluate task's extra link: its run's report, served by the look-up app in the api-server
    link = task_instance(dag_run, "evaluate").xcom_pull(task_ids="evaluate", key="_link_EvaluationReportLink")
    assert link == f"recsys/reports/{quote(dag_run.run_id, safe='')}"

    # no experiment running: the analysis is a no-op, and the report has no Experiment section
    assert task_states(dag_run)["analyse_experiment"] == "success"
    assert task_instance(dag_run, "analyse_experiment").xcom_pull(task_ids="analyse_experiment") is None
    assert "no experiment running" in dag_logs(caplog)
    paths = run_paths(recsys_env, window_ending(window_end, PipelineParams()), PipelineParams.from_dict(meta["params"]))
    assert not paths.experiment.exists()
    assert 'id="experiment"' not in (paths.evaluation / "report.html").read_text()

    # publish's failure handler (a timeout, a lost worker after the switch): the history follows Redis
    record_failed_publish = fresh_dag.get_task("publish").on_failure_callback[-1]
    context = {"ti": task_instance(dag_run, "publish"), "run_id": dag_run.run_id}
    history.record_publish(recsys_env, history.recent_runs(recsys_env)[0]["run_key"], history.EVALUATED,
                           dag_run_id=dag_run.run_id)
    record_failed_publish(context)
    [row] = history.recent_runs(recsys_env)
    assert (row["status"], row["published_version"]) == (history.PUBLISHED, meta["version"])
    run_pipeline(recsys_env, window_end, PipelineParams(factors=16))  # another attempt's version goes live
    record_failed_publish(context)
    row = next(row for row in history.recent_runs(recsys_env) if row["dag_run_id"] == dag_run.run_id)
    assert row["status"] == history.FAILED


def test_a_run_with_several_model_families_publishes_the_validation_winner_and_reports_them_all(
    fresh_dag, recsys_env, demo_loaded, window_end
):
    from airflow.utils.state import DagRunState

    families = ["als", "item_knn", "ease", "blend"]
    dag_run = fresh_dag.test(logical_date=window_end, run_conf={"models": families})
    assert dag_run.state == DagRunState.SUCCESS, task_states(dag_run)

    meta = live_meta(*connect(recsys_env))
    params = PipelineParams.from_dict(meta["params"])
    assert list(params.models) == families
    paths = run_paths(recsys_env, window_ending(window_end, params), params)
    report = json.loads((paths.evaluation / EVALUATION_REPORT).read_text())
    candidates = report["selection"]["families"]
    assert set(candidates) == set(families)
    winner = max(families, key=lambda name: candidates[name]["validation"]["map"])  # ties: the earlier one
    assert report["selection"]["chosen"]["family"] == winner == meta["model_family"]["family"]
    page = (paths.evaluation / EVALUATION_HTML).read_text()
    assert f"{winner} (chosen)" in page
    for name in families:
        assert f"<tr><th>{name}" in page and f"{candidates[name]['validation']['map']:.4f}" in page
    [row] = history.recent_runs(recsys_env)
    assert row["metrics"]["family"] == winner and set(row["metrics"]["candidates"]) == set(families)


def test_trigger_without_a_logical_date_runs_the_last_scheduled_window(fresh_dag, recsys_env, demo_loaded, window_end):
    """`airflow dags trigger` without a logical date (or the REST API with ``"logical_date": null``):
    the run has no data interval; its window ends at the last 03:00 UTC before it was triggered."""
    from airflow.utils.state import DagRunState

    dag_run = fresh_dag.test(logical_date=None, run_after=window_end + timedelta(hours=7, minutes=12))
    assert dag_run.data_interval_end is None
    assert dag_run.state == DagRunState.SUCCESS, task_states(dag_run)
    assert live_meta(*connect(recsys_env))["data_end"] == window_end.isoformat()


def airflow_dags_test(env: dict, logical_date) -> subprocess.CompletedProcess:
    """``airflow dags test recsys_daily`` as `make demo` runs it: its own process, its output as a user reads it."""
    command = [sys.executable, "-m", "airflow", "dags", "test", "recsys_daily", logical_date.isoformat()]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


# `airflow dags test` runs Airflow's execution API in its own process through Starlette's TestClient,
# which warns once about its HTTP client: a line of the test command, not of a task
TEST_COMMAND_LINE = "fastapi/testclient.py"


def task_log_lines(output: str) -> list[str]:
    """The lines the tasks logged, from `airflow dags test` output (between its start and end marks
    of each task), without the test command's own."""
    lines, in_task = [], False
    for line in output.splitlines():
        if "[DAG TEST] starting task_id=" in line:
            in_task = True
        elif "[DAG TEST] end task" in line:
            in_task = False
        elif in_task and TEST_COMMAND_LINE not in line:
            lines.append(line)
    return lines


def log_problems(lines: list[str]) -> list[str]:
    """Log lines (one per event) a normal run must not have: a warning, an error, a traceback."""
    return [line for line in lines if re.search(r"\[(warning|error|critical) *\]|Traceback", line)]


def test_a_normal_runs_task_logs_have_no_warning_and_no_traceback(airflow_db, recsys_env, demo_loaded, window_end):
    """What `make demo` and a user reading task logs see: no warning, no traceback, and a one-line
    summary per task from the logger recsys.dags (no "Returned value was: {...}", no mangled module
    name). A refused gate's one line is checked in process (test_gate_refusal_...)."""
    normal = airflow_dags_test(dict(os.environ), window_end)
    output = normal.stdout + normal.stderr
    assert normal.returncode == 0, output[-3000:]
    assert "state=success" in output
    logged = task_log_lines(output)
    assert len([line for line in logged if "[recsys.dags]" in line]) >= 7  # a summary per task
    assert log_problems(logged) == []
    assert not [line for line in logged if "Returned value was" in line or "unusual_prefix" in line]
    assert [line for line in logged if re.search(r"version \S+ is live: \d+ users", line)]


@pytest.fixture
def scheduled_runs(monkeypatch):
    """dag.test() creates manual runs only: with this, the runs it creates are scheduled runs, as the
    scheduler makes them (run type ``scheduled``)."""
    import airflow.models.dagrun as dagrun_module
    from airflow.utils.types import DagRunType

    create_manual = dagrun_module.get_or_create_dagrun

    def create_scheduled(**kwargs):
        dag_run = create_manual(**kwargs)
        dag_run.run_type = DagRunType.SCHEDULED
        kwargs["session"].commit()
        return dag_run

    def scheduled(on: bool) -> None:
        monkeypatch.setattr(dagrun_module, "get_or_create_dagrun", create_scheduled if on else create_manual)

    return scheduled


def test_a_manual_runs_params_stay_live_over_a_scheduled_run_of_the_same_window(
    airflow_db, recsys_env, demo_loaded, window_end, scheduled_runs, caplog
):
    """A paused DAG triggered with changed params and "Unpause on trigger": the scheduler also starts
    that window's scheduled run with default params. Whichever finishes last, the manual run's
    version is the one left live."""
    from airflow.utils.state import DagRunState

    client, keys = connect(recsys_env)
    scheduled_runs(True)
    first = parsed_daily().test(logical_date=window_end)  # the scheduled run finishing first publishes...
    assert task_states(first)["publish"] == "success"
    scheduled_runs(False)
    manual = parsed_daily().test(logical_date=window_end, run_conf={"factors": 32})  # ...the manual run replaces it
    assert task_states(manual)["publish"] == "success"
    chosen = live_meta(client, keys)
    assert chosen["params"]["factors"] == 32
    caplog.clear()

    scheduled_runs(True)
    last = parsed_daily().test(logical_date=window_end)  # a scheduled run finishing after it does not
    said = " ".join(dag_logs(caplog))
    assert last.state == DagRunState.SUCCESS
    states = task_states(last)
    assert states["evaluate"] == "success" and states["prepare_publish"] == states["publish"] == "skipped"
    assert live_meta(client, keys)["version"] == chosen["version"]
    assert f"not published: the live version {chosen['version']} holds this window's data" in said
    assert f"chosen by run {manual.run_id}" in said
    rows = {row["dag_run_id"]: row for row in history.recent_runs(recsys_env)}
    assert rows[manual.run_id]["status"] == "published" and rows[manual.run_id]["published_version"] == chosen["version"]
    assert rows[first.run_id]["status"] == "published"
    assert rows[last.run_id]["status"] == "evaluated" and rows[last.run_id]["published_version"] is None


@pytest.fixture
def alerting_dag(airflow_db, tmp_path, monkeypatch):
    """recsys_daily parsed with RECSYS_ALERT_NOTIFIER set: alerts also go to a file."""
    from airflow.dag_processing.dagbag import DagBag

    alerts = tmp_path / "alerts.txt"
    monkeypatch.setenv("RECSYS_ALERT_NOTIFIER", "helpers:file_alerts")
    monkeypatch.setenv("RECSYS_TEST_ALERTS_FILE", str(alerts))
    loaded = DagBag(dag_folder=str(REPO / "dags")).dags["recsys_daily"]
    for task in loaded.tasks:
        task.retries = 0
    return loaded, alerts


def test_gate_refusal_fails_the_run_and_publishes_nothing(alerting_dag, recsys_env, demo_loaded, window_end, caplog):
    from airflow.utils.state import DagRunState

    dag, alerts = alerting_dag
    dag_run = dag.test(logical_date=window_end, run_conf={"min_lift": 50.0})
    assert dag_run.state == DagRunState.FAILED
    states = task_states(dag_run)
    assert states["evaluate"] == "failed" and states["publish"] == "upstream_failed"
    assert live_meta(*connect(recsys_env)) is None
    assert alerts.read_text().startswith("failed evaluate quality gate refused: model MAP@10")
    (row,) = history.recent_runs(recsys_env)
    assert row["status"] == "refused" and row["dag_run_id"] == dag_run.run_id
    # an expected outcome: one clear line (and the alert), no retry; it ends the task as an
    # ExpectedFailure, which Airflow's task runner logs as one "Task exited" line, without traceback
    [refusal] = dag_logs(caplog, logging.ERROR)
    assert refusal.startswith("quality gate refused: model MAP@10") and refusal.endswith("the live version stays")
    assert task_instance(dag_run, "evaluate").try_number == 1


def test_a_guardrail_stops_a_harmful_variant_before_train_and_alerts_without_failing_the_run(
    alerting_dag, recsys_env, demo_loaded, window_end, caplog
):
    """A running experiment whose treatment halves click-through: analyse_experiment stops it
    (recorded), alerts, writes the analysis to the run's artifacts and the report, and the run
    publishes as usual."""
    from airflow.utils.state import DagRunState

    from recsys.core import experiments

    dag, alerts = alerting_dag
    simulated_experiment(recsys_env, "harmful", lift=-0.5)
    dag_run = dag.test(logical_date=window_end)
    assert dag_run.state == DagRunState.SUCCESS, task_states(dag_run)
    analysed = task_instance(dag_run, "analyse_experiment")
    assert analysed.start_date < task_instance(dag_run, "train").start_date
    summary = analysed.xcom_pull(task_ids="analyse_experiment")
    assert summary["experiment"] == "harmful" and summary["stopped_now"] == ["treatment"]
    stored = experiments.get_experiment(recsys_env, "harmful")
    assert stored.variants[1].stopped_at is not None and stored.running(stored.variants[1].stopped_at)
    [decision] = experiments.guardrail_decisions(recsys_env, "harmful")
    assert decision["variant"] == "treatment" and decision["lift_high"] < 0
    [alert] = alerts.read_text().splitlines()
    assert alert.startswith("failed analyse_experiment experiment harmful: guardrail stopped variant 'treatment'")
    said = dag_logs(caplog)
    assert any(line.startswith("experiment harmful (running): control ") and "stopped: treatment" in line for line in said)
    # the analysis in the run's artifacts (XCom has its path) and in its report
    analysis_path = summary["path"].removeprefix("file://")
    analysis = json.loads(open(analysis_path).read())
    assert analysis["stopped_now"] == ["treatment"] and analysis["decisions"][0]["reason"] == decision["reason"]
    report_page = (Path(analysis_path).parents[1] / "eval" / "report.html").read_text()
    assert "Experiment harmful: running" in report_page and decision["reason"] in report_page
    # the next run finds it stopped already: nothing new to alert
    again = parsed_daily().test(logical_date=window_end)
    assert task_instance(again, "analyse_experiment").xcom_pull(task_ids="analyse_experiment")["stopped_now"] == []
    assert len(alerts.read_text().splitlines()) == 1


def test_backfill_of_an_older_date_skips_publish(alerting_dag, recsys_env, demo_loaded, window_end, caplog):
    from airflow.utils.state import DagRunState

    dag, alerts = alerting_dag
    fresh = run_pipeline(recsys_env, window_end, PipelineParams())
    dag_run = dag.test(logical_date=window_end - timedelta(days=3))
    assert dag_run.state == DagRunState.SUCCESS
    states = task_states(dag_run)
    assert states["prepare_publish"] == states["publish"] == "skipped"
    assert live_meta(*connect(recsys_env))["version"] == fresh.publish.version
    extracted = task_instance(dag_run, "extract").xcom_pull()
    assert "will not publish" in extracted["will_not_publish"]  # said at its start
    # ... and by the publish task itself, in its own log, where a user clicks
    assert any(re.match(r"not published: the live version \S+ holds data up to", line) for line in dag_logs(caplog))
    assert alerts.read_text().splitlines() == ["skipped publish None"]
    backfill, published = history.recent_runs(recsys_env)
    assert backfill["status"] == "skipped_stale" and backfill["dag_run_id"] == dag_run.run_id
    assert published["status"] == "published"


def test_a_shard_marked_success_by_hand_fails_publish_in_one_line(fresh_dag, recsys_env, demo_loaded, window_end, caplog):
    """Marking a running publish_shard success leaves no result: publish refuses to switch, saying
    which shard and what to do, instead of an IndexError."""
    from airflow.utils.state import DagRunState

    dag_run = fresh_dag.test(logical_date=window_end, mark_success_pattern="publish_shard")
    assert dag_run.state == DagRunState.FAILED
    assert task_states(dag_run)["publish"] == "failed"
    [error] = dag_logs(caplog, logging.ERROR)
    assert error.startswith("shard(s) [1] of 1 left no result (marked success by hand?): nothing was switched")
    assert live_meta(*connect(recsys_env)) is None
    (row,) = history.recent_runs(recsys_env)
    assert row["status"] == "failed" and row["dag_run_id"] == dag_run.run_id


def test_sharded_publish_through_a_shared_store_switches_one_complete_version(
    dag, airflow_db, recsys_env, demo_loaded, window_end, tmp_path, monkeypatch
):
    from airflow.utils.state import DagRunState

    store_dir = tmp_path / "store"  # what workers on other machines would share, unlike artifacts_dir
    assert not store_dir.is_relative_to(recsys_env.artifacts_dir)
    monkeypatch.setenv("RECSYS_ARTIFACTS_URL", store_dir.as_uri())
    dag_run = dag.test(logical_date=window_end, run_conf={"publish_shards": 3})
    assert dag_run.state == DagRunState.SUCCESS, task_states(dag_run)
    shard_tis = [ti for ti in dag_run.get_task_instances() if ti.task_id == "publish_shard"]
    assert sorted(ti.map_index for ti in shard_tis) == [0, 1, 2]

    run_key = run_paths(recsys_env, window_ending(window_end, PipelineParams()), PipelineParams()).key
    store = open_store(store_dir.as_uri())
    for folder in (EXTRACT, MATRIX, MODEL, EVALUATION):
        upload = pushed(store, f"{run_key}/{folder}")
        assert upload is not None and upload.files, folder

    build = live_build(*connect(recsys_env))
    meta = build.meta()
    assert meta["counts"]["shards"] == 3
    assert meta["data_end"] == window_end.isoformat()
    users = pq.read_table(recsys_env.artifacts_dir / run_key / MATRIX / "users.parquet").num_rows
    assert build.entry_counts()["user_recs"] == meta["counts"]["users"] == users
    single = run_pipeline(recsys_env, window_end, PipelineParams())  # same version, one shard, no store
    assert single.publish.version == meta["version"]
    assert live_build(*connect(recsys_env)).entry_counts()["user_recs"] == meta["counts"]["users"]


def test_a_publish_emits_the_live_asset_and_queues_the_dags_scheduled_on_it(
    airflow_db, recsys_env, demo_loaded, window_end
):
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from airflow.models.asset import AssetDagRunQueue, AssetEvent, AssetModel
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from sqlalchemy import select, update

    # what the DAG processor and an operator do: register the example DAG, unpause it
    downstream_bag = DagBag(dag_folder=str(REPO / "dags" / "examples"))
    assert downstream_bag.import_errors == {}
    DagBundlesManager().sync_bundles_to_db()
    sync_bag_to_db(downstream_bag, "dags-folder", None)
    with create_session() as session:
        session.execute(update(DagModel).where(DagModel.dag_id == "recsys_after_publish").values(is_paused=False))
    uri = f"recsys://{recsys_env.redis_prefix}/live"  # parsed after recsys_env set the prefix

    dag_run = DagBag(dag_folder=str(REPO / "dags")).dags["recsys_daily"].test(logical_date=window_end)
    assert dag_run.state == DagRunState.SUCCESS, task_states(dag_run)
    meta = live_meta(*connect(recsys_env))
    with create_session() as session:
        asset_id = session.scalars(select(AssetModel.id).where(AssetModel.uri == uri)).one()
        (event,) = session.scalars(select(AssetEvent).where(AssetEvent.asset_id == asset_id)).all()
        queued = session.scalars(
            select(AssetDagRunQueue.target_dag_id).where(AssetDagRunQueue.asset_id == asset_id)
        ).all()
    assert event.extra["version"] == meta["version"]
    assert event.extra["metrics"]["model_map"] == pytest.approx(meta["metrics"]["model"]["map"])
    assert queued == ["recsys_after_publish"]  # the scheduler's next loop starts its run

    downstream = downstream_bag.dags["recsys_after_publish"]
    after = downstream.test()
    assert after.state == DagRunState.SUCCESS
    announced = after.get_task_instances()[0].xcom_pull()
    assert announced["version"] == meta["version"]
