"""The Airflow DAG: integrity, and whole runs through ``dag.test()`` against real Postgres/Redis."""

from __future__ import annotations

from datetime import timedelta
from itertools import pairwise

import pyarrow.parquet as pq
import pytest
from helpers import REPO

from recsys.core.artifacts import open_store, pushed
from recsys.core.layout import EVALUATION, EXTRACT, MATRIX, MODEL, run_paths
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
    assert set(bag.dags) == {"recsys_daily", "recsys_tune"}
    for task in loaded.tasks:
        task.retries = 0  # a failing test must not wait out retry delays
    return loaded


def test_tasks_run_in_order_without_cycles(dag):
    assert sorted(dag.task_ids) == sorted(TASK_ORDER)
    for upstream, downstream in pairwise(TASK_ORDER):
        assert downstream in dag.get_task(upstream).downstream_task_ids
    assert dag.get_task("extract").upstream_task_ids == set()
    assert dag.get_task("publish").downstream_task_ids == set()
    assert [task.task_id for task in dag.topological_sort()] == TASK_ORDER


def test_schedule_is_a_real_daily_data_interval(dag):
    from airflow.sdk import CronDataIntervalTimetable

    assert isinstance(dag.timetable, CronDataIntervalTimetable)
    assert dag.catchup is False


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


def test_full_run_publishes_live_recommendations(dag, airflow_db, recsys_env, demo_loaded, window_end):
    from airflow.utils.state import DagRunState

    dag_run = dag.test(logical_date=window_end)
    assert dag_run.state == DagRunState.SUCCESS, task_states(dag_run)
    build = live_build(*connect(recsys_env))
    meta = build.meta()
    assert meta["data_end"] == window_end.isoformat()
    assert meta["counts"]["users"] == build.entry_counts()["user_recs"] > 100
    _, entry = next(build.entries("user_recs"))
    assert len(entry["recommended_products"]) > 2


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


def test_gate_refusal_fails_the_run_and_publishes_nothing(alerting_dag, recsys_env, demo_loaded, window_end):
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


def test_backfill_of_an_older_date_skips_publish(alerting_dag, recsys_env, demo_loaded, window_end):
    from airflow.utils.state import DagRunState

    dag, alerts = alerting_dag
    fresh = run_pipeline(recsys_env, window_end, PipelineParams())
    dag_run = dag.test(logical_date=window_end - timedelta(days=3))
    assert dag_run.state == DagRunState.SUCCESS
    states = task_states(dag_run)
    assert states["prepare_publish"] == states["publish"] == "skipped"
    assert live_meta(*connect(recsys_env))["version"] == fresh.publish.version
    extracted = next(ti for ti in dag_run.get_task_instances() if ti.task_id == "extract").xcom_pull()
    assert "will not publish" in extracted["will_not_publish"]  # said at its start
    assert alerts.read_text().splitlines() == ["skipped prepare_publish None"]
    backfill, published = history.recent_runs(recsys_env)
    assert backfill["status"] == "skipped_stale" and backfill["dag_run_id"] == dag_run.run_id
    assert published["status"] == "published"


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
    downstream_bag = DagBag(dag_folder=str(REPO / "tests" / "dags"))
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
