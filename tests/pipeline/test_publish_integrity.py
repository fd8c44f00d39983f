"""Publish integrity under races, retries and lost keys (docs/reliability.md): one complete live
version at all times, nothing left without a TTL, kept versions bounded, rollback and republish."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta

import pytest
from helpers import stage

from recsys.core import db
from recsys.core.errors import (
    FutureWindowError,
    IncompleteVersionError,
    PublishConflictError,
    StaleVersionError,
)
from recsys.core.params import PipelineParams
from recsys.core.redis_keys import (
    STRUCTURES,
    delete_all,
    layout,
    live_meta,
    redis_client,
)
from recsys.core.rules import NO_RULES_FINGERPRINT, Rule, add_rule
from recsys.pipeline import stages
from recsys.pipeline.publish import versions
from recsys.pipeline.publish.stage import (
    finish_publish,
    new_attempt,
    prepare_publish,
    publish,
    publish_shard,
)
from recsys.pipeline.stages import run_pipeline

# the gate may compare against an earlier live model of another window: let it always pass
SMALL = PipelineParams(max_map_drop=1.0)


def assert_whole_live_version(client, keys) -> dict:
    """I1 and I3: a complete live version, every other key with a TTL."""
    assert versions.live_problems(client, keys) == []
    assert versions.keys_without_ttl(client, keys) == []
    meta = live_meta(client, keys)
    assert meta is not None
    counts = meta["counts"]
    assert counts["users"] > 0 and counts["products_with_similar"] > 0 and counts["top_buys_lists"] > 0
    assert counts["products_with_bought_together"] > 0
    return meta


def test_two_publishers_of_one_version_leave_one_complete_version(settings, demo_loaded, window_end):
    paths = stage(settings, window_end, SMALL)
    report = paths.evaluation / "report.json"
    errors = []

    def publisher():
        try:
            publish(settings, paths.matrix, paths.model, report, SMALL, shards=2)
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=publisher) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []  # the second waited for the first instead of interleaving
    assert_whole_live_version(redis_client(settings), layout(settings))


@pytest.mark.parametrize("loss", ["restart", "expiry"])
def test_staging_lost_between_tasks_is_staged_again_before_the_switch(settings, demo_loaded, window_end, loss):
    """What a retried DAG task sees after Redis restarted (no persistence) or the staging TTL
    passed between prepare_publish and the shards: finish stages again, never switches less."""
    client, keys = redis_client(settings), layout(settings)
    paths = stage(settings, window_end, SMALL)
    attempt = new_attempt()
    version = prepare_publish(settings, paths.matrix, paths.model, SMALL, attempt)
    if loss == "restart":
        delete_all(client, keys)
    else:
        for key in client.scan_iter(match=f"{keys.tag}:staging:*"):
            client.pexpire(key, 1)
    results = [publish_shard(settings, paths.matrix, paths.model, SMALL, attempt, shard, 2) for shard in range(2)]
    finish_publish(settings, paths.matrix, paths.model, paths.evaluation / "report.json", SMALL, attempt, results, 2)
    meta = assert_whole_live_version(client, keys)
    assert meta["version"] == version


def test_the_switch_refuses_a_version_missing_a_structure(settings, demo_loaded, window_end):
    client, keys = redis_client(settings), layout(settings)
    first = run_pipeline(settings, window_end - timedelta(days=1), SMALL)
    paths = stage(settings, window_end, SMALL)
    attempt = new_attempt()
    version = prepare_publish(settings, paths.matrix, paths.model, SMALL, attempt)
    publish_shard(settings, paths.matrix, paths.model, SMALL, attempt, 0, 1)
    client.delete(keys.staging(version, attempt, "top_buys"))
    staged_meta = keys.staging(version, attempt, "meta")
    client.hset(staged_meta, mapping={
        "version": version, "counts": '{"users": 1, "products_with_similar": 1, "top_buys_lists": 1}',
    })
    client.expire(staged_meta, 60)
    client.set(keys.owner(version), attempt, px=60_000)
    with pytest.raises(IncompleteVersionError, match="staged user_recs holds"):
        versions.switch_live(client, keys, version, attempt, window_end.timestamp(), window_end.timestamp() + 1, 1, 60)
    assert live_meta(client, keys)["version"] == first.publish.version
    assert_whole_live_version(client, keys)


def test_a_writer_killed_mid_write_leaves_keys_that_expire(settings, demo_loaded, window_end, monkeypatch):
    """The TTL comes with the first HSET: stop a shard after its first round trip (as a SIGKILL
    would) and its staging hash already expires."""
    from recsys.pipeline.publish import stage as publish_module

    monkeypatch.setattr(publish_module, "HSET_CHUNK", 5)
    monkeypatch.setattr(publish_module, "HSETS_PER_ROUND_TRIP", 1)
    checks = []

    def killed_after_first_round_trip(self):
        checks.append(1)
        if len(checks) > 1:
            raise KeyboardInterrupt("killed")

    paths = stage(settings, window_end, SMALL)
    attempt = new_attempt()
    version = prepare_publish(settings, paths.matrix, paths.model, SMALL, attempt)
    monkeypatch.setattr(versions.VersionOwner, "check", killed_after_first_round_trip)
    with pytest.raises(KeyboardInterrupt):
        publish_shard(settings, paths.matrix, paths.model, SMALL, attempt, 0, 1)
    client, keys = redis_client(settings), layout(settings)
    assert client.hlen(keys.staging(version, attempt, "user_recs")) == 5
    assert versions.keys_without_ttl(client, keys) == []


def test_orphaned_staging_keys_go_even_when_the_run_is_stale(settings, demo_loaded, window_end):
    client, keys = redis_client(settings), layout(settings)
    run_pipeline(settings, window_end, SMALL)
    # left by a publisher of the layout before attempts that died before its TTL was set
    orphan = f"{keys.tag}:staging:20260101T000000Z-0123456789:user_recs"
    client.hset(orphan, "1", "{}")
    with pytest.raises(StaleVersionError):
        run_pipeline(settings, window_end - timedelta(days=3), SMALL)
    assert not client.exists(orphan)
    assert_whole_live_version(client, keys)


def test_a_publisher_never_switches_while_another_owns_the_version(settings, demo_loaded, window_end):
    impatient = settings.model_copy(update={"publish_lock_wait_seconds": 0.5})
    paths = stage(impatient, window_end, SMALL)
    attempt = new_attempt()
    version = prepare_publish(impatient, paths.matrix, paths.model, SMALL, attempt)
    results = [publish_shard(impatient, paths.matrix, paths.model, SMALL, attempt, 0, 1)]
    client, keys = redis_client(impatient), layout(impatient)
    client.set(keys.owner(version), "another-attempt", px=60_000)  # took over while this one lapsed
    with pytest.raises(PublishConflictError, match="being published by another attempt"):
        finish_publish(impatient, paths.matrix, paths.model, paths.evaluation / "report.json", SMALL, attempt, results, 1)
    with pytest.raises(PublishConflictError, match="another attempt"):
        versions.switch_live(client, keys, version, attempt, window_end.timestamp(), window_end.timestamp(), 1, 60)
    assert live_meta(client, keys) is None  # nothing went live from the attempt that lost its lock
    client.delete(keys.owner(version))


def test_same_window_runs_take_turns(settings, demo_loaded, window_end):
    errors, results = [], []

    def run():
        try:
            results.append(run_pipeline(settings, window_end, SMALL))
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len({result.publish.version for result in results}) == 1
    assert_whole_live_version(redis_client(settings), layout(settings))


def test_a_future_window_is_refused_and_later_runs_still_publish(settings, demo_loaded, window_end):
    with pytest.raises(FutureWindowError, match="after now"):
        run_pipeline(settings, datetime.now(UTC) + timedelta(days=3), SMALL)
    assert not list(settings.artifacts_dir.glob("runs/*"))  # refused before any work
    assert run_pipeline(settings, window_end, SMALL).publish.users > 0


def test_the_switch_refuses_data_from_the_future(settings, demo_loaded, window_end):
    """Defence in depth: even a run planned without the check cannot go live."""
    end = datetime.now(UTC).replace(microsecond=0) + timedelta(days=3)
    paths = stage(settings, end, SMALL)  # stage() plans without the check
    with pytest.raises(IncompleteVersionError, match="future"):
        publish(settings, paths.matrix, paths.model, paths.evaluation / "report.json", SMALL)
    assert live_meta(redis_client(settings), layout(settings)) is None


def test_kept_versions_are_bounded(settings, demo_loaded, window_end):
    keep_two = settings.model_copy(update={"keep_versions": 2})
    published = [run_pipeline(keep_two, window_end - timedelta(days=days), SMALL).publish.version for days in (3, 2, 1, 0)]
    client, keys = redis_client(settings), layout(settings)
    found = versions.versions(client, keys)
    assert [(info.role, info.version) for info in found] == [
        ("live", published[3]), ("kept", published[2]), ("kept", published[1]),
    ]
    assert all(info.complete for info in found)
    assert not any(client.exists(keys.previous(published[0], s)) for s in STRUCTURES)
    assert_whole_live_version(client, keys)


def test_rollback_and_republish_restore_a_complete_version(settings, demo_loaded, window_end):
    client, keys = redis_client(settings), layout(settings)
    older = run_pipeline(settings, window_end - timedelta(days=1), SMALL).publish.version
    newer = run_pipeline(settings, window_end, SMALL).publish.version

    client.delete(*(keys.live(s) for s in STRUCTURES))  # live keys lost
    assert "recsys rollback" in stages.recovery_hint(settings)
    assert versions.rollback(client, keys, settings.previous_version_ttl_seconds) == older
    assert assert_whole_live_version(client, keys)["version"] == older

    delete_all(client, keys)  # Redis lost everything
    assert "recsys republish" in stages.recovery_hint(settings)
    result = stages.republish(settings)
    assert result.version == newer
    assert assert_whole_live_version(client, keys)["version"] == newer


def test_rollback_checks_bought_together_and_accepts_a_version_from_before_it(settings, demo_loaded, window_end):
    """A kept version missing bought-together entries its meta counts is refused; one published
    before the structure existed (no count, no key) is complete and rolls back."""
    client, keys = redis_client(settings), layout(settings)
    older = run_pipeline(settings, window_end - timedelta(days=1), SMALL).publish.version
    newer = run_pipeline(settings, window_end, SMALL).publish.version
    kept_meta, kept_together = keys.previous(older, "meta"), keys.previous(older, "bought_together")
    client.hdel(kept_together, next(iter(client.hkeys(kept_together))))

    with pytest.raises(IncompleteVersionError, match="bought_together"):
        versions.rollback(client, keys, settings.previous_version_ttl_seconds, older)
    assert live_meta(client, keys)["version"] == newer

    counts = json.loads(client.hget(kept_meta, "counts"))
    del counts["products_with_bought_together"]
    client.hset(kept_meta, "counts", json.dumps(counts))
    client.delete(kept_together)  # as a version published before bought_together existed
    assert [info.complete for info in versions.versions(client, keys)] == [True, True]
    assert versions.rollback(client, keys, settings.previous_version_ttl_seconds, older) == older
    assert versions.live_problems(client, keys) == [] and versions.keys_without_ttl(client, keys) == []
    assert not client.exists(keys.live("bought_together"))
    assert versions.rollback(client, keys, settings.previous_version_ttl_seconds) == newer
    assert assert_whole_live_version(client, keys)["version"] == newer


def test_cli_versions_rollback_and_a_future_end(recsys_env, demo_loaded, window_end):
    def recsys(*args, columns: int = 200):
        env = {**os.environ, "COLUMNS": str(columns)}
        return subprocess.run([sys.executable, "-m", "recsys", *args], capture_output=True, text=True, timeout=300, env=env)

    small = ["-p", "max_map_drop=1.0"]
    assert recsys("run", "--end", (window_end - timedelta(days=1)).isoformat(), *small).returncode == 0
    assert recsys("run", "--end", window_end.isoformat(), *small).returncode == 0
    listed = recsys("versions")
    assert listed.returncode == 0 and "kept" in listed.stdout and "live" in listed.stdout
    # in a narrow terminal no version name or date is cut
    found = versions.versions(redis_client(recsys_env), layout(recsys_env))
    for columns in (60, 200):
        shown = recsys("versions", columns=columns).stdout
        assert max(len(line) for line in shown.splitlines()) <= columns, shown
        for info in found:
            assert info.version in shown and info.data_end in shown and info.published_at in shown, shown

    future = recsys("run", "--end", (datetime.now(UTC) + timedelta(days=3)).isoformat(), *small)
    assert future.returncode == 1
    assert "after now" in future.stderr and "Traceback" not in future.stderr
    assert len(future.stderr.strip().splitlines()) == 1

    rolled = recsys("rollback")
    assert rolled.returncode == 0, rolled.stderr
    client, keys = redis_client(recsys_env), layout(recsys_env)
    assert live_meta(client, keys)["data_end"] == (window_end - timedelta(days=1)).isoformat()


def test_every_step_of_an_attempt_applies_the_rules_its_prepare_read(settings, demo_loaded, window_end):
    """A rule added while an attempt runs waits for the next attempt: shards and the switch apply
    the snapshot prepare recorded, so no version mixes two rule sets."""
    client, keys = redis_client(settings), layout(settings)
    paths = stage(settings, window_end, SMALL)
    attempt = new_attempt()
    prepare_publish(settings, paths.matrix, paths.model, SMALL, attempt)
    with db.connect(settings) as conn:
        [(product,)] = conn.execute("SELECT product_id FROM products WHERE active ORDER BY product_id LIMIT 1").fetchall()
    add_rule(settings, Rule("pin", product_id=product, rank=1))
    results = [publish_shard(settings, paths.matrix, paths.model, SMALL, attempt, shard, 2) for shard in range(2)]
    finish_publish(settings, paths.matrix, paths.model, paths.evaluation / "report.json", SMALL, attempt, results, 2)
    meta = assert_whole_live_version(client, keys)
    assert meta["rules_fingerprint"] == NO_RULES_FINGERPRINT
    lists = [json.loads(entry)["recommended_products"] for entry in client.hvals(keys.live("user_recs"))]
    assert sum(str(products[0]) == product for products in lists) < len(lists) // 2  # not pinned

    publish(settings, paths.matrix, paths.model, paths.evaluation / "report.json", SMALL)  # the next attempt
    meta = assert_whole_live_version(client, keys)
    assert meta["rules_fingerprint"] != NO_RULES_FINGERPRINT
    with db.connect(settings) as conn:
        owners = {u for (u,) in conn.execute(
            "SELECT user_id FROM interactions WHERE product_id = %s AND event_type IN ('purchase', 'rating')", (product,)
        )}
    lists = {user: json.loads(entry)["recommended_products"] for user, entry in client.hgetall(keys.live("user_recs")).items()}
    assert all(str(products[0]) == product for user, products in lists.items() if user not in owners)
