"""Merchandising rules applied to ranked lists, the same way at publish and in the API.

A :class:`~recsys.core.rules.RuleSnapshot` is compiled against a version's catalogue (item
indices) once; each user then gets the :class:`UserRules` of their segments. Conflicts are
resolved in one order (docs/rules.md):

1. **exclude** wins over everything: an excluded product (by rule, or inactive in the catalogue
   now) is never listed, pinned or not;
2. **boost / bury** multiply the model's score (several matching rules multiply together) before
   the diversity re-ranking sees the scores;
3. **pins** are placed last: by rank, the newest rule first when two want the same rank (the
   other takes the next free one); a pinned product listed elsewhere moves to its rank, and a
   product the user already has (or that the request excludes) is not pinned for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from recsys.core.rules import MAX_FACTOR, Rule, RuleSnapshot

INACTIVE = "inactive"  # why a product is kept out when no rule, but the catalogue, says so


@dataclass(frozen=True)
class Pin:
    rule_id: int
    item: int
    rank: int  # 1-based


@dataclass(frozen=True)
class UserRules:
    """What the rules in force do for one combination of segments."""

    blocked: np.ndarray  # bool per item: kept out by an exclude rule or by being inactive now
    factors: np.ndarray | None  # score multiplier per item; None when no boost or bury applies
    pins: tuple[Pin, ...]  # for the main list, in placing order
    category_pins: dict[str, tuple[Pin, ...]]  # for ``?category=`` lists
    rules: tuple[Rule, ...]  # every rule that applies (for tracing)

    def pins_for(self, category: str | None) -> tuple[Pin, ...]:
        return self.pins if category is None else self.category_pins.get(category, ())

    @cached_property
    def blocked_items(self) -> np.ndarray:
        return np.flatnonzero(self.blocked).astype(np.int32)


def _placing_order(pins: Iterable[Pin]) -> tuple[Pin, ...]:
    # by rank; on one rank the newest rule first, so it keeps the rank
    return tuple(sorted(pins, key=lambda pin: (pin.rank, -pin.rule_id)))


class Merchandising:
    """A rule snapshot compiled against one catalogue (``item_ids``, ``categories`` per item)."""

    def __init__(self, snapshot: RuleSnapshot, item_ids: Sequence[str], categories: np.ndarray) -> None:
        self.snapshot = snapshot
        self.fingerprint = snapshot.ordering_fingerprint()
        self.n_items = len(item_ids)
        index = {item_id: i for i, item_id in enumerate(item_ids)}
        categories = np.asarray(categories, dtype=object)
        self._targets: dict[int, np.ndarray] = {}
        for rule in snapshot.rules:
            if rule.product_id is not None:
                found = [index[rule.product_id]] if rule.product_id in index else []
            elif rule.category is not None:
                found = np.flatnonzero(categories == rule.category).tolist()
            else:
                found = [index[p] for p in snapshot.attribute_matches.get(rule.rule_id, ()) if p in index]
            self._targets[rule.rule_id] = np.asarray(found, dtype=np.int64)
        self.inactive = np.zeros(self.n_items, dtype=bool)
        self.inactive[[index[p] for p in snapshot.inactive_products if p in index]] = True
        self._by_segments: dict[frozenset[str], UserRules] = {}

    @property
    def segment_names(self) -> list[str]:
        return sorted(self.snapshot.segments)

    def segments_of(self, user_id: str) -> frozenset[str]:
        return frozenset(name for name, users in self.snapshot.segments.items() if user_id in users)

    def for_user(self, user_id: str) -> UserRules:
        return self.for_segments(self.segments_of(user_id))

    def for_segments(self, segments: frozenset[str]) -> UserRules:
        if segments not in self._by_segments:
            self._by_segments[segments] = self._compile(segments)
        return self._by_segments[segments]

    def targets(self, rule: Rule) -> np.ndarray:
        return self._targets[rule.rule_id]

    def _compile(self, segments: frozenset[str]) -> UserRules:
        rules = tuple(r for r in self.snapshot.rules if r.segment is None or r.segment in segments)
        blocked = self.inactive.copy()
        factors = np.ones(self.n_items, dtype=np.float64)
        for rule in rules:
            if rule.kind == "exclude":
                blocked[self._targets[rule.rule_id]] = True
            elif rule.kind in ("boost", "bury"):
                factors[self._targets[rule.rule_id]] *= rule.factor
        # each factor is bounded (MAX_FACTOR); so is their product, to stay a finite float32 score
        factors = np.clip(factors, MAX_FACTOR**-2, MAX_FACTOR**2).astype(np.float32)
        pins: list[Pin] = []
        category_pins: dict[str, list[Pin]] = {}
        for rule in rules:
            targets = self._targets[rule.rule_id]
            if rule.kind != "pin" or len(targets) == 0 or blocked[targets[0]]:
                continue
            pin = Pin(rule.rule_id, int(targets[0]), int(rule.rank))
            (pins if rule.scope_category is None else category_pins.setdefault(rule.scope_category, [])).append(pin)
        return UserRules(
            blocked=blocked,
            factors=None if np.all(factors == 1) else factors,
            pins=_placing_order(pins),
            category_pins={name: _placing_order(group) for name, group in category_pins.items()},
            rules=rules,
        )

    def exclusion_reason(self, user_rules: UserRules, item: int) -> str | int | None:
        """The rule id that keeps ``item`` out for these rules (the oldest), ``INACTIVE``, or None."""
        for rule in user_rules.rules:
            if rule.kind == "exclude" and item in self._targets[rule.rule_id]:
                return rule.rule_id
        return INACTIVE if self.inactive[item] else None


def place_pins(lists: np.ndarray, pins: Sequence[Pin], n: int, unavailable: np.ndarray | None = None) -> np.ndarray:
    """Rows of ``lists`` (item indices, best first, -1 padded) cut to ``n`` with ``pins`` placed.

    ``pins`` in placing order (``UserRules.pins``); ``unavailable`` (rows × pins, bool) marks a
    pin that must not be placed in a row (the user has the product, or the request excludes it).
    Idempotent: placing the same pins on a list that has them changes nothing, so the API can
    place them again after filtering a published list. Rows keep their other items in order;
    empty slots (-1) end a row, so a pin beyond a short list's end closes it.
    """
    lists = np.asarray(lists)
    out = np.full((len(lists), n), -1, dtype=lists.dtype)
    if not pins or len(lists) == 0:
        width = min(n, lists.shape[1])
        out[:, :width] = lists[:, :width]
        return out
    pins = list(pins)
    available = np.ones((len(lists), len(pins)), dtype=bool) if unavailable is None else ~np.asarray(unavailable, dtype=bool)
    patterns, which = np.unique(available, axis=0, return_inverse=True)
    for pattern_index, pattern in enumerate(patterns):
        rows = np.flatnonzero(which.reshape(-1) == pattern_index)
        slots: dict[int, int] = {}  # slot -> item
        for pin, placed in zip(pins, pattern, strict=True):
            if not placed or pin.item in slots.values():
                continue
            slot = pin.rank - 1
            while slot in slots:
                slot += 1
            if slot < n:
                slots[slot] = pin.item
        part = lists[rows]
        keep = (part >= 0) & ~np.isin(part, list(slots.values()))
        order = np.argsort(~keep, axis=1, kind="stable")
        kept = np.where(np.take_along_axis(keep, order, axis=1), np.take_along_axis(part, order, axis=1), -1)
        free = [slot for slot in range(n) if slot not in slots]
        filled = np.full((len(rows), n), -1, dtype=out.dtype)
        width = min(len(free), kept.shape[1])
        filled[:, free[:width]] = kept[:, :width]
        for slot, item in slots.items():
            filled[:, slot] = item
        out[rows] = filled
    # pins beyond a short list's end close it up: no empty slot before a product
    order = np.argsort(out < 0, axis=1, kind="stable")
    return np.take_along_axis(out, order, axis=1)


def place_pins_in_list(ranked: list[int], pins: Sequence[Pin], n: int, unavailable: Iterable[int] = ()) -> list[int]:
    """:func:`place_pins` for one list (the API), ``unavailable``: items not to pin."""
    if not pins:
        return ranked[:n]
    skip = set(unavailable)
    row = np.asarray([ranked if ranked else [-1]], dtype=np.int64)
    mask = np.asarray([[pin.item in skip for pin in pins]])
    placed = place_pins(row, pins, n, mask)[0]
    return [int(i) for i in placed if i >= 0]


def trace(
    merchandising: Merchandising, user_rules: UserRules, before: list[int], after: list[int], category: str | None,
    published: tuple[Merchandising, UserRules] | None = None,
) -> list[dict]:
    """Why the rules moved products: ``before`` is the list ranked without rules, ``after`` the
    one answered (both item indices, best first). One entry per product a rule touched.
    ``published``: the rules the answered list was published with, when it is a published list
    (a product those rules left out stays out of it until the next publish, whatever rules are in
    force now)."""
    entries = []
    rank_before = {item: r + 1 for r, item in enumerate(before)}
    rank_after = {item: r + 1 for r, item in enumerate(after)}
    pinned = {pin.item: pin for pin in user_rules.pins_for(category)}
    for item in after:
        moved = {"item": item, "rank_before": rank_before.get(item), "rank_after": rank_after[item]}
        if item in pinned:
            entries.append({**moved, "rule_id": pinned[item].rule_id, "kind": "pin", "effect": f"pinned at rank {rank_after[item]}"})
        else:
            entries += _scored(merchandising, user_rules, item, moved)
    for item in before:
        if item in rank_after:
            continue
        gone = {"item": item, "rank_before": rank_before[item], "rank_after": None}
        reason = merchandising.exclusion_reason(user_rules, item)
        at_publish = None if published is None else published[0].exclusion_reason(published[1], item)
        if reason is not None:
            kind = "inactive" if reason == INACTIVE else "exclude"
            entries.append({**gone, "rule_id": None if reason == INACTIVE else reason, "kind": kind, "effect": "removed"})
        elif at_publish is not None:
            why = "inactive in the catalogue then" if at_publish == INACTIVE else f"rule {at_publish}, no longer in force,"
            entries.append({
                **gone, "rule_id": None if at_publish == INACTIVE else at_publish, "kind": "excluded_at_publish",
                "effect": f"left out of the published list: {why} excluded it at publish; listed again after the next publish",
            })
        else:
            entries += _scored(merchandising, user_rules, item, gone) or [
                {**gone, "rule_id": None, "kind": "displaced", "effect": "pushed below the list by pinned or boosted products"}
            ]
    return entries


def _scored(merchandising: Merchandising, user_rules: UserRules, item: int, moved: dict) -> list[dict]:
    """Trace entries of the boosts and buries that multiplied ``item``'s score."""
    return [
        {**moved, "rule_id": rule.rule_id, "kind": rule.kind, "effect": f"score ×{rule.factor:g}"}
        for rule in user_rules.rules
        if rule.kind in ("boost", "bury") and item in merchandising.targets(rule)
    ]
