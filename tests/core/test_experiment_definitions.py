"""Experiment definitions and the stable assignment (``recsys.core.experiments``): validation in
one line naming the field and value, shares within the sample-ratio tolerance, stability, and who
gets the control."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from scipy.stats import chisquare

from recsys.core.errors import InputError
from recsys.core.experiments import (
    Assignment,
    Experiment,
    Guardrail,
    Variant,
    experiment_from_options,
    parse_guardrail,
    parse_override,
    parse_variant,
)
from recsys.core.params import PipelineParams

NOW = datetime(2026, 11, 29, 12, tzinfo=UTC)
USERS = [f"user-{i}" for i in range(60_000)]


def two_way(name: str = "diversity", shares=(0.5, 0.5), salt: str = "salt-1", **fields) -> Experiment:
    return Experiment(
        name=name, salt=salt, starts_at=NOW - timedelta(days=1),
        variants=(Variant("control", shares[0]), Variant("diverse", shares[1], {"diversity_lambda": 0.0})), **fields,
    )


def counts(experiment: Experiment, at: datetime = NOW) -> dict[tuple[str, bool], int]:
    found: dict[tuple[str, bool], int] = {}
    for user in USERS:
        assignment = experiment.assign(user, at)
        key = (assignment.variant, assignment.enrolled)
        found[key] = found.get(key, 0) + 1
    return found


@pytest.mark.parametrize(
    ("variants", "fields", "message"),
    [
        ((Variant("control", 0.5),), {}, "needs 2 or more variants, got 1"),
        ((Variant("a", 0.5), Variant("a", 0.5)), {}, "variant names must differ, repeated: a"),
        ((Variant("a", 0.7), Variant("b", 0.4)), {}, "shares must sum to at most 1, got 0.7 + 0.4 = 1.1"),
        ((Variant("a", 0.5), Variant("b", 0)), {}, "variant 'b' share must be in (0, 1], got 0"),
        ((Variant("a", 0.5), Variant("b", 0.5, {"diversity_lambda": 2})), {},
         "variant 'b' params: invalid parameters: diversity_lambda must be in [0, 1], got 2"),
        ((Variant("a", 0.5), Variant("b", 0.5, {"factor": 8})), {}, "variant 'b' params: unknown parameters: factor"),
        ((Variant("a", 0.5), Variant("B C", 0.5)), {}, "variant name 'B C' must be 1 to 63 of a-z"),
        ((Variant("a", 0.5), Variant("b", 0.5)), {"primary_metric": "revenue"},
         "primary_metric must be one of click_through, conversion, got 'revenue'"),
        ((Variant("a", 0.5), Variant("b", 0.5)), {"guardrails": (Guardrail("conversion", 1.5),)},
         "guardrail conversion max_drop must be in [0, 1), got 1.5"),
        ((Variant("a", 0.5), Variant("b", 0.5)), {"starts_at": NOW, "ends_at": NOW},
         "end 2026-11-29T12:00:00+00:00 is not after start 2026-11-29T12:00:00+00:00"),
    ],
)
def test_bad_definitions_get_one_line_naming_the_field_and_value(variants, fields, message):
    with pytest.raises(InputError) as raised:
        Experiment(name="exp", variants=variants, **fields)
    text = str(raised.value)
    assert "\n" not in text
    assert text.startswith("invalid experiment 'exp': ")
    assert message in text


def test_every_problem_of_a_definition_is_named_at_once():
    with pytest.raises(InputError) as raised:
        Experiment(name="Bad Name", variants=(Variant("a", 0.9, {"top_n": 0}),), primary_metric="x")  # type: ignore[arg-type]
    text = str(raised.value)
    for part in ("experiment name 'Bad Name'", "2 or more variants", "top_n must be >= 1, got 0", "primary_metric"):
        assert part in text


def test_any_pipeline_param_can_be_overridden_and_applies_over_the_base():
    variant = Variant("big", 0.5, {"factors": 128, "top_n": 20, "diversity_lambda": 0.0,
                                   "event_weights": {"purchase": 5, "view": 1}})
    assert variant.problems() == []
    base = PipelineParams(lookback_days=60, top_n=10)
    applied = variant.pipeline_params(base)
    assert (applied.factors, applied.top_n, applied.diversity_lambda, applied.lookback_days) == (128, 20, 0.0, 60)
    assert applied.event_weights == {"purchase": 5.0, "view": 1.0}
    assert "event_weights" in Variant("x", 0.5, {"event_weights": [1, 2]}).problems()[0]


def test_shares_hold_within_the_sample_ratio_tolerance():
    experiment = Experiment(
        name="three", salt="s", starts_at=NOW - timedelta(days=1),
        variants=(Variant("control", 0.2), Variant("b", 0.3), Variant("c", 0.1)),
    )
    found = counts(experiment)
    enrolled = {variant: found.get((variant, True), 0) for variant in ("control", "b", "c")}
    # 40 % outside the shares: the control, not enrolled
    assert found[("control", False)] == len(USERS) - sum(enrolled.values())
    assert set(found) == {("control", True), ("b", True), ("c", True), ("control", False)}
    observed = [enrolled["control"], enrolled["b"], enrolled["c"], found[("control", False)]]
    expected = np.array([0.2, 0.3, 0.1, 0.4]) * len(USERS)
    assert chisquare(observed, expected).pvalue > 0.001  # the analysis's own SRM threshold


def test_assignment_is_stable_and_independent_between_experiments():
    first = two_way(salt="alpha")
    again = Experiment(**{**first.__dict__})  # as read back from the table
    sample = USERS[:5_000]
    assert [first.assign(u, NOW) for u in sample] == [again.assign(u, NOW) for u in sample]
    # later, and after the other variants' params changed, nobody moves
    moved = replace(first, variants=(Variant("control", 0.5, {"top_n": 20}), first.variants[1]))
    assert [first.assign(u, NOW).variant for u in sample] == [moved.assign(u, NOW + timedelta(hours=5)).variant for u in sample]
    # another salt (another experiment) splits the users independently of this one
    other = two_way(name="diversity", salt="beta")
    both = sum(first.assign(u, NOW).variant == "diverse" and other.assign(u, NOW).variant == "diverse" for u in USERS)
    assert abs(both / len(USERS) - 0.25) < 0.01
    renamed = two_way(name="diversity-2", salt="alpha")
    agree = sum(first.assign(u, NOW).variant == renamed.assign(u, NOW).variant for u in USERS)
    assert abs(agree / len(USERS) - 0.5) < 0.01


def test_growing_a_share_keeps_the_users_already_in_it():
    small = two_way(shares=(0.1, 0.1))
    large = two_way(shares=(0.1, 0.3))
    in_small = {u for u in USERS if small.assign(u, NOW).enrolled}
    assert len(in_small) > 0.15 * len(USERS)
    assert all(large.assign(u, NOW) == small.assign(u, NOW) for u in in_small)


def test_outside_the_running_time_or_after_a_stop_everyone_gets_the_control():
    experiment = two_way(ends_at=NOW + timedelta(days=1))
    user = next(u for u in USERS if experiment.assign(u, NOW).variant == "diverse")
    assert experiment.assign(user, NOW).enrolled
    for at in (NOW - timedelta(days=2), NOW + timedelta(days=1)):
        assert experiment.assign(user, at) == Assignment("control", enrolled=False)
    stopped = replace(experiment, stopped_at=NOW + timedelta(hours=1))
    assert stopped.assign(user, NOW).variant == "diverse"
    assert not stopped.assign(user, NOW + timedelta(hours=2)).enrolled
    assert stopped.status(NOW + timedelta(hours=2)) == "stopped"
    guarded = replace(experiment, variants=(experiment.variants[0], replace(experiment.variants[1], stopped_at=NOW)))
    assert guarded.assign(user, NOW).variant == "control" and not guarded.assign(user, NOW).enrolled
    controls = [u for u in USERS[:2_000] if experiment.assign(u, NOW).variant == "control"]
    assert all(guarded.assign(u, NOW).enrolled for u in controls)  # the control's users stay in


def test_command_line_options_make_a_definition():
    experiment = experiment_from_options(
        "diversity", ["control:0.5", "diverse:0.5"], ["diverse.diversity_lambda=0.3", "diverse.top_n=20"],
        "click-through", None, None, None,
    )
    assert experiment.variants[1].params == {"diversity_lambda": 0.3, "top_n": 20}
    assert experiment.guardrails == (Guardrail("click_through", 0.0),)
    assert parse_variant("a:b:0.25") == ("a:b", 0.25)
    assert parse_override('x.event_weights={"view": 2}') == ("x", "event_weights", {"view": 2})
    assert parse_guardrail("conversion:0.05") == Guardrail("conversion", 0.05)
    for bad, message in [
        (lambda: parse_variant("control"), "--variant 'control' must be NAME:SHARE"),
        (lambda: parse_override("diversity_lambda=0.3"), "--set 'diversity_lambda=0.3' must be VARIANT.PARAM=VALUE"),
        (lambda: parse_guardrail("revenue"), "guardrail metric must be one of click_through, conversion, got 'revenue'"),
        (lambda: experiment_from_options("e", ["a:0.5", "b:0.5"], ["c.top_n=3"], "conversion", None, None, None),
         "--set 'c.top_n=3' names variant 'c', not one of --variant: a, b"),
    ]:
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            bad()


def test_a_snapshot_read_back_assigns_every_user_as_the_original():
    experiment = replace(
        two_way(ends_at=NOW + timedelta(days=3)),
        guardrails=(Guardrail("conversion", 0.05),), stopped_at=NOW + timedelta(days=2), stop_reason="enough",
    )
    again = Experiment.from_snapshot(json.loads(json.dumps(experiment.snapshot())))
    assert again == experiment
    assert "salt" not in experiment.to_dict()
    assert [again.assign(u, NOW) for u in USERS[:3_000]] == [experiment.assign(u, NOW) for u in USERS[:3_000]]
