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
from helpers import published_entries, stage

from recsys.core import db
from recsys.core.errors import (
    FutureWindowError,
    IncompleteVersionError,
    PublishConflictError,
    StaleVersionError,
)
from recsys.core.params import PipelineParams
from recsys.core.rules import NO_RULES_FINGERPRINT, Rule, add_rule
from recsys.pipeline import stages
from recsys.pipeline.publish.stage import (
    finish_publish,
    new_attempt,
    prepare_publish,
    publish,
    publish_shard,
)
from recsys.pipeline.stages import run_pipeline
from recsys.storage import builds, connect, versions
from recsys.storage.builds import READER_GRACE_SECONDS, Build
from recsys.storage.keys import BUCKETED, build_name
from recsys.storage.locks import VersionOwner
from recsys.storage.reads import delete_all, live_meta

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


def attempt_keys(keys, build: str) -> list[str]:
    """Every key a publish attempt's build may have."""
    found = [key for bucket in range(keys.buckets) for key in keys.build_keys(build, bucket)]
    return [*found, keys.manifest(build), keys.meta(build), keys.top_buys(build)]


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
    assert_whole_live_version(*connect(settings))


@pytest.mark.parametrize("loss", ["restart", "expiry"])
def test_staging_lost_between_tasks_is_staged_again_before_the_switch(settings, demo_loaded, window_end, loss):
    """What a retried DAG task sees after Redis restarted (no persistence) or the staging TTL
    passed between prepare_publish and the shards: finish stages again, never switches less."""
    client, keys = connect(settings)
    paths = stage(settings, window_end, SMALL)
    attempt = new_attempt()
    version = prepare_publish(settings, paths.matrix, paths.model, SMALL, attempt)
    if loss == "restart":
        delete_all(client, keys)
    else:
        for key in attempt_keys(keys, build_name(version, attempt)):
            client.pexpire(key, 1)
    results = [publish_shard(settings, paths.matrix, paths.model, SMALL, attempt, shard, 2) for shard in range(2)]
    finish_publish(settings, paths.matrix, paths.model, paths.evaluation / "report.json", SMALL, attempt, results, 2)
    meta = assert_whole_live_version(client, keys)
    assert meta["version"] == version


def _staged(settings, window_end, paths=None) -> tuple[Build, dict]:
    """A build staged in full (prepare and one shard) whose infos and meta are written as finish
    writes them, ready to switch; returns it and its per-bucket counts."""
    client, keys = connect(settings)
    paths = paths or stage(settings, window_end, SMALL)
    attempt = new_attempt()
    version = prepare_publish(settings, paths.matrix, paths.model, SMALL, attempt)
    publish_shard(settings, paths.matrix, paths.model, SMALL, attempt, 0, 1)
    build = Build(client, keys, version, attempt)
    counts = {structure: [0] * keys.buckets for structure in BUCKETED}
    for state in build.states():
        for structure in BUCKETED:
            counts[structure][state.bucket] = state.found[structure]
    totals = {"users": sum(counts["user_recs"]), "products_with_similar": sum(counts["similar_products"]),
              "products_with_bought_together": sum(counts["bought_together"]),
              "top_buys_lists": client.hlen(keys.top_buys(build.name))}
    build.write_infos(counts)
    build.write_meta({"version": version, "build": build.name, "counts": json.dumps(totals),
                      "data_end_ts": repr(window_end.timestamp())})
    client.set(keys.owner(version), attempt, px=60_000)
    return build, counts


def _switch(settings, build: Build, window_end) -> None:
    builds.switch(build.client, build, window_end.timestamp(), window_end.timestamp() + 1, 1, 60,
                  settings.publish_lock_ttl_seconds, 1)


def test_the_switch_refuses_a_build_with_a_bucket_short(settings, demo_loaded, window_end):
    """Every bucket of every structure is checked against the count its info records: one entry
    gone from one bucket, and nothing switches."""
    client, keys = connect(settings)
    first = run_pipeline(settings, window_end - timedelta(days=1), SMALL)
    build, counts = _staged(settings, window_end)
    bucket = next(b for b, n in enumerate(counts["bought_together"]) if n > 0)
    key = build.key("bought_together", bucket)
    client.hdel(key, client.hrandfield(key))
    with pytest.raises(IncompleteVersionError, match=f"bought_together of bucket {bucket} holds"):
        _switch(settings, build, window_end)
    assert live_meta(client, keys)["version"] == first.publish.version
    assert_whole_live_version(client, keys)  # the refused build kept its TTLs


def test_a_writer_killed_mid_write_leaves_keys_that_expire(settings, demo_loaded, window_end, monkeypatch):
    """The TTL comes with the first HSET: stop a shard after its first round trip (as a SIGKILL
    would) and its keys already expire."""
    from recsys.storage import builds as builds_module

    monkeypatch.setattr(builds_module, "HSET_CHUNK", 5)
    monkeypatch.setattr(builds_module, "HSETS_PER_ROUND_TRIP", 1)
    checks = []

    def killed_after_first_round_trip(self):
        checks.append(1)
        if len(checks) > 1:
            raise KeyboardInterrupt("killed")

    paths = stage(settings, window_end, SMALL)
    attempt = new_attempt()
    version = prepare_publish(settings, paths.matrix, paths.model, SMALL, attempt)
    monkeypatch.setattr(VersionOwner, "check", killed_after_first_round_trip)
    with pytest.raises(KeyboardInterrupt):
        publish_shard(settings, paths.matrix, paths.model, SMALL, attempt, 0, 1)
    client, keys = connect(settings)
    written = Build(client, keys, version, attempt).states()
    assert sum(state.found["user_recs"] for state in written) == 5
    assert versions.keys_without_ttl(client, keys) == []


def test_a_build_left_without_ttl_is_swept_even_when_the_run_is_stale(settings, demo_loaded, window_end):
    """A publisher that died between removing its build's TTLs and the flip leaves keys that
    would live forever (I3); the next publish sweeps them, even one refused as stale. The old
    layout's live keys (before builds) get the rollback window."""
    client, keys = connect(settings)
    run_pipeline(settings, window_end - timedelta(days=2), SMALL)
    build, _ = _staged(settings, window_end)
    build.register()
    build.set_ttl(-1)
    client.delete(keys.owner(build.version))  # the publisher died: its lock lapsed
    client.hset(f"{keys.tag}:user_recs", "1", "{}")  # the old layout's live user hash
    assert versions.keys_without_ttl(client, keys) != []
    with pytest.raises(StaleVersionError):
        run_pipeline(settings, window_end - timedelta(days=3), SMALL)
    assert versions.keys_without_ttl(client, keys) == []
    assert 0 < client.ttl(build.key("user_recs", 0)) <= READER_GRACE_SECONDS
    assert client.ttl(f"{keys.tag}:user_recs") > READER_GRACE_SECONDS
    assert_whole_live_version(client, keys)


def test_a_switch_that_died_before_settling_is_settled_by_the_next(settings, demo_loaded, window_end, monkeypatch):
    """Between the flip and the settle the replaced build still has no TTL (I3 broken): the next
    switch (or sweep, or rollback) gives it its TTL first."""
    client, keys = connect(settings)
    run_pipeline(settings, window_end - timedelta(days=2), SMALL)
    monkeypatch.setattr(builds, "settle", lambda client, keys: None)
    run_pipeline(settings, window_end - timedelta(days=1), SMALL)
    assert versions.live_problems(client, keys) == []
    assert versions.keys_without_ttl(client, keys) != []  # the replaced build, not settled
    monkeypatch.undo()
    run_pipeline(settings, window_end, SMALL)
    assert_whole_live_version(client, keys)


def test_a_publisher_never_switches_while_another_owns_the_version(settings, demo_loaded, window_end):
    impatient = settings.model_copy(update={"publish_lock_wait_seconds": 0.5})
    paths = stage(impatient, window_end, SMALL)
    attempt = new_attempt()
    version = prepare_publish(impatient, paths.matrix, paths.model, SMALL, attempt)
    results = [publish_shard(impatient, paths.matrix, paths.model, SMALL, attempt, 0, 1)]
    client, keys = connect(impatient)
    client.set(keys.owner(version), "another-attempt", px=60_000)  # took over while this one lapsed
    with pytest.raises(PublishConflictError, match="being published by another attempt"):
        finish_publish(impatient, paths.matrix, paths.model, paths.evaluation / "report.json", SMALL, attempt, results, 1)
    client.delete(keys.owner(version))
    build, _ = _staged(impatient, window_end, paths)
    client.set(keys.owner(version), "another-attempt", px=60_000)
    with pytest.raises(PublishConflictError, match="another attempt"):
        _switch(impatient, build, window_end)
    assert live_meta(client, keys) is None  # nothing went live from the attempt that lost its lock
    assert versions.keys_without_ttl(client, keys) == []  # the refused build got its TTLs back
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
    assert_whole_live_version(*connect(settings))


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
    assert live_meta(*connect(settings)) is None


def test_kept_versions_are_bounded(settings, demo_loaded, window_end):
    keep_two = settings.model_copy(update={"keep_versions": 2})
    published = [run_pipeline(keep_two, window_end - timedelta(days=days), SMALL).publish.version for days in (3, 2, 1, 0)]
    client, keys = connect(settings)
    found = versions.versions(client, keys)
    assert [(info.role, info.version) for info in found] == [
        ("live", published[3]), ("kept", published[2]), ("kept", published[1]),
    ]
    assert all(info.complete for info in found)
    # the oldest left the history: still readable for a reader holding an old pointer, not for long
    dropped = [key for key in stray_keys(client, keys) if published[0] in key]
    assert dropped and all(0 < client.ttl(key) <= READER_GRACE_SECONDS for key in dropped)
    assert_whole_live_version(client, keys)


def stray_keys(client, keys) -> list[str]:
    from recsys.storage.reads import all_keys

    return sorted(all_keys(client, keys))


def test_rollback_and_republish_restore_a_complete_version(settings, demo_loaded, window_end):
    client, keys = connect(settings)
    older = run_pipeline(settings, window_end - timedelta(days=1), SMALL).publish.version
    newer = run_pipeline(settings, window_end, SMALL).publish.version

    lost = builds.pointer(client, keys)["build"]
    client.delete(keys.pointer(), *(key for key in attempt_keys(keys, lost) if keys.tag in key))  # live keys lost
    assert "recsys rollback" in stages.recovery_hint(settings)
    assert versions.rollback(client, keys, settings.previous_version_ttl_seconds, None, 5, 5) == older
    assert assert_whole_live_version(client, keys)["version"] == older

    delete_all(client, keys)  # Redis lost everything
    assert "recsys republish" in stages.recovery_hint(settings)
    result = stages.republish(settings)
    assert result.version == newer
    assert assert_whole_live_version(client, keys)["version"] == newer


def test_rollback_refuses_an_incomplete_kept_version_and_goes_back_and_forth(settings, demo_loaded, window_end):
    """A kept build missing an entry its info counts is refused; complete ones roll back and forth,
    each switch leaving I1 and I3 whole."""
    client, keys = connect(settings)
    older = run_pipeline(settings, window_end - timedelta(days=1), SMALL).publish.version
    newer = run_pipeline(settings, window_end, SMALL).publish.version
    [kept] = client.lrange(keys.history(), 0, -1)
    bucket = next(state.bucket for state in builds.bucket_states(client, keys, kept) if state.found["bought_together"])
    key = keys.data(kept, bucket, "bought_together")
    field, value = next(iter(client.hgetall(key).items()))
    client.hdel(key, field)

    with pytest.raises(IncompleteVersionError, match="bought_together"):
        versions.rollback(client, keys, settings.previous_version_ttl_seconds, older, 5, 5)
    assert live_meta(client, keys)["version"] == newer
    assert versions.keys_without_ttl(client, keys) == []

    client.hset(key, field, value)
    assert [info.complete for info in versions.versions(client, keys)] == [True, True]
    assert versions.rollback(client, keys, settings.previous_version_ttl_seconds, older, 5, 5) == older
    assert_whole_live_version(client, keys)
    assert versions.rollback(client, keys, settings.previous_version_ttl_seconds, None, 5, 5) == newer
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
    found = versions.versions(*connect(recsys_env))
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
    client, keys = connect(recsys_env)
    assert live_meta(client, keys)["data_end"] == (window_end - timedelta(days=1)).isoformat()


def test_every_step_of_an_attempt_applies_the_rules_its_prepare_read(settings, demo_loaded, window_end):
    """A rule added while an attempt runs waits for the next attempt: shards and the switch apply
    the snapshot prepare recorded, so no version mixes two rule sets."""
    client, keys = connect(settings)
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
    lists = [entry["recommended_products"] for entry in published_entries(settings).values()]
    assert sum(str(products[0]) == product for products in lists) < len(lists) // 2  # not pinned

    publish(settings, paths.matrix, paths.model, paths.evaluation / "report.json", SMALL)  # the next attempt
    meta = assert_whole_live_version(client, keys)
    assert meta["rules_fingerprint"] != NO_RULES_FINGERPRINT
    with db.connect(settings) as conn:
        owners = {u for (u,) in conn.execute(
            "SELECT user_id FROM interactions WHERE product_id = %s AND event_type IN ('purchase', 'rating')", (product,)
        )}
    lists = {user: entry["recommended_products"] for user, entry in published_entries(settings).items()}
    assert all(str(products[0]) == product for user, products in lists.items() if user not in owners)
