"""The chaos suite (`recsys chaos`): a seeded subset of its trials, and its invariant checks shown
to catch broken states. The full run (`recsys chaos --trials 200`) is a command, not a CI step."""

from __future__ import annotations

import pytest

from recsys.bench.chaos import CLUSTER_KINDS, KINDS, run_chaos
from recsys.storage import connect, versions
from recsys.storage.reads import live_build

TRIALS_PER_KIND = 1  # every fault kind once in CI; `recsys chaos --trials 200` is the full run


def test_every_fault_kind_keeps_the_invariants():
    report = run_chaos(trials=TRIALS_PER_KIND * len(KINDS), seed=20261129, log=print)
    assert report.faults == {kind: TRIALS_PER_KIND for kind in KINDS}
    assert report.violations == 0, [(o.trial, o.kind, o.violations) for o in report.outcomes if o.violations]
    assert report.reader_answers.get(200, 0) > 100  # the reader really read throughout
    assert sum(o.landed for o in report.outcomes) >= len(KINDS) * TRIALS_PER_KIND // 2  # most struck mid-work


def test_a_cluster_keeps_the_invariants_through_its_own_faults():
    """On a 3-master cluster of its own: a master killed or failed over and slots migrated
    mid-publish, a master down while the API serves, and the whole cluster killed and restarted
    (from its AOF, and empty). Every kind once is `recsys chaos --cluster --trials 13`."""
    kinds = ("redis_kill_mid_publish", "redis_restart_between_tasks", *CLUSTER_KINDS)
    report = run_chaos(trials=len(kinds), seed=20261204, kinds=kinds, log=print, cluster=True)
    assert report.faults == dict.fromkeys(kinds, 1)
    assert report.violations == 0, [(o.trial, o.kind, o.violations) for o in report.outcomes if o.violations]
    assert report.reader_answers.get(200, 0) > 100


@pytest.mark.parametrize(
    "damage", ["top buys gone", "bucket short", "info gone", "meta gone", "TTL on live", "fold-in uncounted"]
)
def test_the_live_check_sees_a_broken_version(settings, demo_loaded, window_end, damage):
    from recsys.core.params import PipelineParams
    from recsys.pipeline.stages import run_pipeline

    run_pipeline(settings, window_end, PipelineParams())
    client, keys = connect(settings)
    build = live_build(client, keys)
    assert versions.live_problems(client, keys) == []
    user_recs = build.keys.data(build.name, 3, "user_recs")
    if damage == "top buys gone":
        client.delete(keys.top_buys(build.name))
    elif damage == "bucket short":
        client.hdel(user_recs, client.hrandfield(user_recs))
    elif damage == "info gone":
        client.delete(build.keys.data(build.name, 5, "info"))
    elif damage == "meta gone":
        client.delete(keys.meta(build.name))
    elif damage == "TTL on live":
        client.expire(build.keys.data(build.name, 7, "similar_products"), 3600)
    else:
        client.hset(user_recs, "a-user-no-info-counts", "{}")
    assert versions.live_problems(client, keys) != []


def test_the_ttl_check_sees_a_key_that_would_live_forever(settings):
    client, keys = connect(settings)
    stray = keys.data("20260101T000000Z-0123456789.abc", 0, "user_recs")
    client.hset(stray, "1", "1")
    client.expire(stray, 60)
    assert versions.keys_without_ttl(client, keys) == []
    client.persist(stray)
    assert versions.keys_without_ttl(client, keys) == [stray]


def test_the_rules_check_sees_a_version_made_without_the_rules(settings, demo_loaded, window_end):
    from recsys.bench.chaos import rules_problems
    from recsys.core.params import PipelineParams
    from recsys.core.rules import NO_RULES_FINGERPRINT
    from recsys.pipeline.stages import run_pipeline

    run_pipeline(settings, window_end, PipelineParams())  # no rule in force
    client, keys = connect(settings)
    listed = str(live_build(client, keys).top_buys()["top_buys"][0])
    assert rules_problems(client, keys, NO_RULES_FINGERPRINT, "no-such-product") == []
    problems = rules_problems(client, keys, "another-fingerprint", listed)
    assert problems[0].startswith("I6: live rules_fingerprint")
    assert any(f"lists excluded product {listed}" in problem for problem in problems[1:])
