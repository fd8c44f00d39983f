"""Merchandising rules on ranked lists (``recsys.ml.merchandising``) and the rule model
(``recsys.core.rules``): validation, the conflict order, pins, and the ordering fingerprint."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from recsys.core.errors import InputError
from recsys.core.rules import NO_RULES_FINGERPRINT, Rule, RuleSnapshot, parse_attribute
from recsys.ml.merchandising import INACTIVE, Merchandising, Pin, place_pins, place_pins_in_list, trace

NOW = datetime(2026, 11, 29, 12, tzinfo=UTC)
ITEMS = [f"p{i}" for i in range(8)]
CATEGORIES = np.array(["shoes", "shoes", "hats", "hats", "bags", "bags", None, "shoes"], dtype=object)


def compiled(*rules: Rule, inactive=(), matches=None, segments=None) -> Merchandising:
    numbered = tuple(rule if rule.rule_id else Rule(**{**rule.__dict__, "rule_id": i + 1}) for i, rule in enumerate(rules))
    snapshot = RuleSnapshot(NOW, numbered, matches or {}, frozenset(inactive), segments or {})
    return Merchandising(snapshot, ITEMS, CATEGORIES)


def test_pins_take_their_rank_and_move_a_listed_product():
    lists = np.array([[5, 1, 2, 3], [1, 2, 3, 4]])
    placed = place_pins(lists, [Pin(1, 3, 1)], 4)
    # row 0 did not list 3: it enters at rank 1 and pushes the last one out; row 1 listed it: it moves
    assert placed.tolist() == [[3, 5, 1, 2], [3, 1, 2, 4]]
    # idempotent: the API places the same pins again on a published list
    assert place_pins(placed, [Pin(1, 3, 1)], 4).tolist() == placed.tolist()


def test_two_pins_on_one_rank_the_newest_keeps_it():
    rules = compiled(Rule("pin", product_id="p6", rank=2), Rule("pin", product_id="p7", rank=2))
    pins = rules.for_segments(frozenset()).pins
    assert [pin.item for pin in pins] == [7, 6]  # rule 2 is newer than rule 1
    assert place_pins_in_list([0, 1, 2, 3], pins, 4) == [0, 7, 6, 1]


def test_a_pin_is_not_placed_where_unavailable_and_closes_a_short_list():
    pins = [Pin(1, 6, 1), Pin(2, 7, 4)]
    placed = place_pins(np.array([[0, 1, -1, -1], [0, 1, 2, 3]]), pins, 4, np.array([[True, False], [False, False]]))
    # row 0 owns 6 (not pinned) and its rank-4 pin lands after its two products, with no gap
    assert placed.tolist() == [[0, 1, 7, -1], [6, 0, 1, 7]]
    # a rank beyond the list's length is not shown
    assert place_pins(np.array([[0, 1]]), [Pin(3, 7, 3)], 2).tolist() == [[0, 1]]


def test_exclude_wins_over_pin_and_boost():
    rules = compiled(
        Rule("pin", product_id="p3", rank=1),
        Rule("boost", category="hats", factor=3.0),
        Rule("exclude", product_id="p3"),
    )
    everyone = rules.for_segments(frozenset())
    assert everyone.blocked[3] and not everyone.pins
    assert rules.exclusion_reason(everyone, 3) == 3


def test_boosts_and_buries_multiply_and_hold_for_their_segment_only():
    rules = compiled(
        Rule("boost", category="shoes", factor=2.0),
        Rule("boost", product_id="p0", factor=1.5),
        Rule("bury", product_id="p1", factor=0.5, segment="vip"),
        segments={"vip": frozenset({"u1"})},
    )
    everyone, vip = rules.for_user("u2"), rules.for_user("u1")
    assert everyone.factors.tolist() == pytest.approx([3.0, 2.0, 1, 1, 1, 1, 1, 2.0])
    assert vip.factors.tolist() == pytest.approx([3.0, 1.0, 1, 1, 1, 1, 1, 2.0])
    assert rules.for_user("u1") is vip  # compiled once per combination of segments


def test_attribute_and_inactive_exclusions():
    rules = compiled(Rule("exclude", attribute="in_stock", attribute_value=False),
                     matches={1: ("p4", "unknown-product")}, inactive={"p5"})
    everyone = rules.for_segments(frozenset())
    assert np.flatnonzero(everyone.blocked).tolist() == [4, 5]
    assert rules.exclusion_reason(everyone, 4) == 1 and rules.exclusion_reason(everyone, 5) == INACTIVE


def test_category_pins_apply_to_that_category_only():
    rules = compiled(Rule("pin", product_id="p7", rank=1, scope_category="shoes"))
    everyone = rules.for_segments(frozenset())
    assert everyone.pins == () and [p.item for p in everyone.pins_for("shoes")] == [7]
    assert everyone.pins_for("hats") == ()


def test_trace_names_the_rule_behind_each_move():
    rules = compiled(Rule("pin", product_id="p6", rank=1), Rule("exclude", product_id="p2"),
                     Rule("boost", product_id="p3", factor=2.0))
    everyone = rules.for_segments(frozenset())
    entries = {e["item"]: e for e in trace(rules, everyone, [0, 1, 2, 3], [6, 3, 0, 1], None)}
    assert entries[6]["kind"] == "pin" and entries[6]["rank_before"] is None and entries[6]["rank_after"] == 1
    assert entries[3]["kind"] == "boost" and (entries[3]["rank_before"], entries[3]["rank_after"]) == (4, 2)
    assert entries[2] == {"item": 2, "rank_before": 3, "rank_after": None, "rule_id": 2, "kind": "exclude", "effect": "removed"}


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (dict(kind="pin", product_id="p1"), "a pin needs a rank"),
        (dict(kind="pin", category="shoes", rank=1), "a pin targets one product"),
        (dict(kind="boost", product_id="p1", factor=0.5), "a boost needs a factor > 1"),
        (dict(kind="bury", product_id="p1", factor=2), "a bury needs a factor below 1"),
        # beyond float32's range a boost overflowed to inf: NaN scores on request, an exclusion at publish
        (dict(kind="boost", product_id="p1", factor=float("inf")), "at most 1000, got inf"),
        (dict(kind="boost", product_id="p1", factor=1e39), "at most 1000, got 1e+39"),
        (dict(kind="boost", product_id="p1", factor=float("nan")), "a boost needs a factor > 1"),
        (dict(kind="bury", product_id="p1", factor=1e-39), "at least 0.001, got 1e-39"),
        (dict(kind="exclude", product_id="p1", category="shoes"), "exactly one of product, category or attribute"),
        (dict(kind="boost", attribute="in_stock", attribute_value=True, factor=2), "only exclude rules target an attribute"),
        (dict(kind="exclude", category="shoes", scope_category="hats"), "only pins are scoped"),
        (dict(kind="promote", product_id="p1"), "kind must be one of pin, boost, bury, exclude"),
        (dict(kind="exclude", product_id="p1", valid_from=NOW, valid_until=NOW - timedelta(days=1)), "is not after valid_from"),
        (dict(kind="exclude", product_id="p\x00"), "printable"),
    ],
)
def test_invalid_rules_say_what_is_wrong(rule, message):
    with pytest.raises(InputError, match="invalid rule: .*" + re.escape(message)):
        Rule(**rule)


def test_windows_are_half_open_and_naive_times_are_utc():
    rule = Rule("exclude", product_id="p1", valid_from=datetime(2026, 12, 1), valid_until=datetime(2026, 12, 2))
    assert rule.valid_from.tzinfo is UTC
    assert not rule.in_force(datetime(2026, 11, 30, 23, 59, tzinfo=UTC))
    assert rule.in_force(datetime(2026, 12, 1, tzinfo=UTC))
    assert not rule.in_force(datetime(2026, 12, 2, tzinfo=UTC))


def test_attribute_values_are_json_scalars():
    assert parse_attribute("in_stock=false") == ("in_stock", False)
    assert parse_attribute("min_age=18") == ("min_age", 18)
    assert parse_attribute("label=clearance") == ("label", "clearance")
    with pytest.raises(InputError, match="name=value"):
        parse_attribute("in_stock")
    with pytest.raises(InputError, match="true, false, a number or a string"):
        parse_attribute("tags=[1]")


def test_only_ordering_rules_and_their_segments_change_the_fingerprint():
    pin = Rule("pin", product_id="p1", rank=1, rule_id=1)
    base = RuleSnapshot(NOW, (pin,))
    assert base.ordering_fingerprint() != NO_RULES_FINGERPRINT
    exclude = Rule("exclude", product_id="p2", rule_id=2)
    # exclusions are filtered out of published lists when read: they do not make lists stale
    assert RuleSnapshot(NOW, (pin, exclude), inactive_products=frozenset({"p3"})).ordering_fingerprint() == base.ordering_fingerprint()
    noted = Rule("pin", product_id="p1", rank=1, rule_id=1, note="black friday")
    assert RuleSnapshot(NOW + timedelta(hours=1), (noted,)).ordering_fingerprint() == base.ordering_fingerprint()
    assert RuleSnapshot(NOW, (Rule("pin", product_id="p1", rank=2, rule_id=1),)).ordering_fingerprint() != base.ordering_fingerprint()
    vip = Rule("boost", product_id="p1", factor=2, segment="vip", rule_id=3)
    one = RuleSnapshot(NOW, (vip,), segments={"vip": frozenset({"u1"})})
    two = RuleSnapshot(NOW, (vip,), segments={"vip": frozenset({"u1", "u2"})})
    assert one.ordering_fingerprint() != two.ordering_fingerprint()
    assert RuleSnapshot.from_dict(two.to_dict()).ordering_fingerprint() == two.ordering_fingerprint()
