"""The chaos suite (`recsys chaos`): a seeded subset of its trials, and its invariant checks shown
to catch broken states. The full run (`recsys chaos --trials 200`) is a command, not a CI step."""

from __future__ import annotations

import pytest

from recsys.bench.chaos import KINDS, run_chaos
from recsys.core.redis_keys import layout, redis_client
from recsys.pipeline.publish import versions

TRIALS_PER_KIND = 1  # every fault kind once in CI; `recsys chaos --trials 200` is the full run


def test_every_fault_kind_keeps_the_invariants():
    report = run_chaos(trials=TRIALS_PER_KIND * len(KINDS), seed=20261129, log=print)
    assert report.faults == {kind: TRIALS_PER_KIND for kind in KINDS}
    assert report.violations == 0, [(o.trial, o.kind, o.violations) for o in report.outcomes if o.violations]
    assert report.reader_answers.get(200, 0) > 100  # the reader really read throughout
    assert sum(o.landed for o in report.outcomes) >= len(KINDS) * TRIALS_PER_KIND // 2  # most struck mid-work


@pytest.mark.parametrize("damage", ["structure gone", "count off", "meta gone", "TTL on live"])
def test_the_live_check_sees_a_broken_version(settings, demo_loaded, window_end, damage):
    from recsys.core.params import PipelineParams
    from recsys.pipeline.stages import run_pipeline

    run_pipeline(settings, window_end, PipelineParams())
    client, keys = redis_client(settings), layout(settings)
    assert versions.live_problems(client, keys) == []
    if damage == "structure gone":
        client.delete(keys.live("top_buys"))
    elif damage == "count off":
        client.hdel(keys.live("user_recs"), client.hrandfield(keys.live("user_recs")))
    elif damage == "meta gone":
        client.delete(keys.live("meta"))
    else:
        client.expire(keys.live("similar_products"), 3600)
    assert versions.live_problems(client, keys) != []


def test_the_ttl_check_sees_a_key_that_would_live_forever(settings):
    client, keys = redis_client(settings), layout(settings)
    client.set(f"{keys.tag}:staging:x:y:user_recs", "1", ex=60)
    assert versions.keys_without_ttl(client, keys) == []
    client.persist(f"{keys.tag}:staging:x:y:user_recs")
    assert versions.keys_without_ttl(client, keys) == [f"{keys.tag}:staging:x:y:user_recs"]


def test_the_rules_check_sees_a_version_made_without_the_rules(settings, demo_loaded, window_end):
    from recsys.bench.chaos import rules_problems
    from recsys.core.params import PipelineParams
    from recsys.core.redis_keys import top_buys
    from recsys.core.rules import NO_RULES_FINGERPRINT
    from recsys.pipeline.stages import run_pipeline

    run_pipeline(settings, window_end, PipelineParams())  # no rule in force
    client, keys = redis_client(settings), layout(settings)
    listed = str(top_buys(client, keys)["top_buys"][0])
    assert rules_problems(client, keys, NO_RULES_FINGERPRINT, "no-such-product") == []
    problems = rules_problems(client, keys, "another-fingerprint", listed)
    assert problems[0].startswith("I6: live rules_fingerprint")
    assert any(f"lists excluded product {listed}" in problem for problem in problems[1:])
