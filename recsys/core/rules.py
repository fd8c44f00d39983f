"""Merchandising rules: what a shop team sets on top of the model, stored in the shop's
``recommendation_rules`` table (``recsys rules add|list|remove``; docs/rules.md).

- ``pin``: a product at a rank of the user's list (or, with ``scope_category``, of the lists of
  one category);
- ``boost`` / ``bury``: a product's or a category's scores multiplied by a factor (> 1 / < 1);
- ``exclude``: a product, a category, or every product with an attribute value (``in_stock`` =
  false, ``age_restricted`` = true) kept out of every list.

Any rule may hold for one user segment (``user_segments``) and for a window [valid_from,
valid_until). :class:`RuleSnapshot` is what publish and the API apply: the rules in force at one
moment, with the products they and the catalogue's inactive flags keep out, and the members of
the segments they name. How rules act on a ranked list lives in ``recsys.ml.merchandising``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Literal, get_args

import psycopg

from recsys.core import db
from recsys.core.errors import InputError
from recsys.core.settings import Settings

RuleKind = Literal["pin", "boost", "bury", "exclude"]
KINDS: tuple[str, ...] = get_args(RuleKind)
MAX_PIN_RANK = 100
MAX_TEXT_LENGTH = 128  # ids, categories, attributes, segments: the API's id limit
MAX_NOTE_LENGTH = 500
# a boost or bury multiplies float32 scores: beyond this a factor stops ordering and starts
# overflowing (inf, then NaN in the diversity re-ranking) or flushing scores to 0
MAX_FACTOR = 1000.0
# what a rule decides about order, as opposed to what it keeps out: a published list is still
# right after an order-free change (it is filtered when read), not after an order change
ORDERING_KINDS = ("pin", "boost", "bury")


def _text(name: str, value: str | None, problems: list[str]) -> None:
    if value is not None and (not value or len(value) > MAX_TEXT_LENGTH or not value.isprintable()):
        problems.append(f"{name} {value[:40]!r} must be 1 to {MAX_TEXT_LENGTH} printable characters")


@dataclass(frozen=True)
class Rule:
    kind: RuleKind
    product_id: str | None = None
    category: str | None = None
    attribute: str | None = None
    attribute_value: Any = None  # a JSON scalar: true, false, a number or a string
    scope_category: str | None = None
    segment: str | None = None
    rank: int | None = None
    factor: float | None = None
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    note: str | None = None
    rule_id: int | None = None
    created_at: datetime | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.kind not in KINDS:
            problems.append(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        targets = [name for name in ("product_id", "category", "attribute") if getattr(self, name) is not None]
        if len(targets) != 1:
            problems.append(f"a rule targets exactly one of product, category or attribute, got {len(targets)}")
        if self.attribute is not None and self.kind != "exclude":
            problems.append("only exclude rules target an attribute")
        if (self.attribute is None) != (self.attribute_value is None):
            problems.append("an attribute needs a value (attribute=value)")
        if self.attribute_value is not None and not isinstance(self.attribute_value, bool | int | float | str):
            problems.append(f"attribute value must be true, false, a number or a string, got {self.attribute_value!r}")
        for name in ("product_id", "category", "attribute", "scope_category", "segment"):
            _text(name, getattr(self, name), problems)
        if self.kind == "pin":
            if self.product_id is None:
                problems.append("a pin targets one product")
            if self.rank is None or not 1 <= self.rank <= MAX_PIN_RANK:
                problems.append(f"a pin needs a rank in 1..{MAX_PIN_RANK}, got {self.rank!r}")
        elif self.rank is not None:
            problems.append(f"only pins have a rank ({self.kind} got rank {self.rank})")
        if self.scope_category is not None and self.kind != "pin":
            problems.append("only pins are scoped to a category's lists")
        if self.kind == "boost" and not (self.factor is not None and 1 < self.factor <= MAX_FACTOR):
            problems.append(f"a boost needs a factor > 1 and at most {MAX_FACTOR:g}, got {self.factor!r}")
        if self.kind == "bury" and not (self.factor is not None and 1 / MAX_FACTOR <= self.factor < 1):
            problems.append(f"a bury needs a factor below 1 and at least {1 / MAX_FACTOR:g}, got {self.factor!r}")
        if self.kind in ("pin", "exclude") and self.factor is not None:
            problems.append(f"a {self.kind} has no factor")
        for name in ("valid_from", "valid_until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                object.__setattr__(self, name, value.replace(tzinfo=UTC))  # naive times are UTC
        if self.valid_from and self.valid_until and self.valid_until <= self.valid_from:
            problems.append(f"valid_until {self.valid_until.isoformat()} is not after valid_from {self.valid_from.isoformat()}")
        if self.note is not None and len(self.note) > MAX_NOTE_LENGTH:
            problems.append(f"note is longer than {MAX_NOTE_LENGTH} characters")
        if problems:
            raise InputError("invalid rule: " + "; ".join(problems))

    def in_force(self, at: datetime) -> bool:
        return (self.valid_from is None or self.valid_from <= at) and (self.valid_until is None or at < self.valid_until)

    @property
    def target(self) -> str:
        if self.product_id is not None:
            return f"product {self.product_id}"
        if self.category is not None:
            return f"category {self.category}"
        return f"{self.attribute}={json.dumps(self.attribute_value)}"

    def describe(self) -> str:
        """One line, e.g. ``pin product 45 at rank 1 in category shoes for segment vip``."""
        if self.kind == "pin":
            what = f"pin {self.target} at rank {self.rank}"
        elif self.kind == "exclude":
            what = f"exclude {self.target}"
        else:
            what = f"{self.kind} {self.target} ×{self.factor:g}"
        if self.scope_category is not None:
            what += f" in category {self.scope_category}"
        if self.segment is not None:
            what += f" for segment {self.segment}"
        return what

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        for name in ("valid_from", "valid_until", "created_at"):
            values[name] = None if values[name] is None else values[name].isoformat()
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Rule:
        values = dict(values)
        for name in ("valid_from", "valid_until", "created_at"):
            if isinstance(values.get(name), str):
                values[name] = datetime.fromisoformat(values[name])
        return cls(**values)

    def ordering_key(self) -> dict[str, Any]:
        """What of the rule decides order (not its note or when it was written)."""
        values = self.to_dict()
        for name in ("note", "created_at", "valid_from", "valid_until"):
            values.pop(name)
        return values


def parse_attribute(text: str) -> tuple[str, Any]:
    """``in_stock=false`` -> ("in_stock", False): the value is read as JSON if it is JSON
    (true, false, 3, "x"), else as a string."""
    name, sep, raw = text.partition("=")
    if not sep or not name or not raw:
        raise InputError(f"attribute {text[:60]!r} must be name=value, e.g. in_stock=false")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if value is None or isinstance(value, list | dict):
        raise InputError(f"attribute value {raw[:40]!r} must be true, false, a number or a string")
    return name, value


# --- the table ---------------------------------------------------------------------------------

_COLUMNS = ("rule_id", "kind", "product_id", "category", "attribute", "attribute_value", "scope_category",
            "segment", "rank", "factor", "valid_from", "valid_until", "note", "created_at")


def _rule(row: tuple) -> Rule:
    values = dict(zip(_COLUMNS, row, strict=True))
    try:
        return Rule(**values)
    except InputError as error:
        # stored before a check existed (or by hand): name it, so the operator can remove it
        raise InputError(
            f"stored rule {values['rule_id']} is not valid ({str(error).removeprefix('invalid rule: ')}); "
            f"remove it with `recsys rules remove {values['rule_id']}` and add it again"
        ) from None


def _missing_table() -> InputError:
    return InputError("the shop database has no recommendation_rules table: run `recsys init-db` (idempotent)")


def check_targets(settings: Settings, rule: Rule) -> None:
    """A rule on a product or category the catalogue does not hold is a typo, not a rule."""
    with db.connect(settings) as conn:
        if rule.product_id is not None:
            found = conn.execute(db.sql_text(settings, "product_category"), {"product_id": rule.product_id}).fetchone()
            if found is None:
                raise InputError(f"product {rule.product_id!r} is not in the catalogue (products table)")
            if rule.scope_category is not None and found[0] != rule.scope_category:
                raise InputError(
                    f"product {rule.product_id!r} is in category {found[0]!r}, not {rule.scope_category!r}: "
                    "a pin in a category's lists must be a product of that category"
                )
        for category in {rule.category, rule.scope_category} - {None}:
            if conn.execute(db.sql_text(settings, "category_exists"), {"category": category}).fetchone() is None:
                raise InputError(f"no product of the catalogue has category {category!r}")


def add_rule(settings: Settings, rule: Rule) -> Rule:
    """Validate the rule's targets against the catalogue and store it; returns it with its id."""
    check_targets(settings, rule)
    values = rule.to_dict()
    values["valid_from"], values["valid_until"] = rule.valid_from, rule.valid_until
    values["attribute_value"] = None if rule.attribute is None else json.dumps(rule.attribute_value)
    try:
        with db.connect(settings) as conn:
            rule_id, created_at = conn.execute(db.sql_text(settings, "insert_rule"), values).fetchone()
    except psycopg.errors.UndefinedTable:
        raise _missing_table() from None
    return replace(rule, rule_id=rule_id, created_at=created_at)


def list_rules(settings: Settings) -> list[Rule]:
    try:
        with db.connect(settings) as conn:
            return [_rule(row) for row in conn.execute(db.sql_text(settings, "all_rules")).fetchall()]
    except psycopg.errors.UndefinedTable:
        raise _missing_table() from None


def remove_rule(settings: Settings, rule_id: int) -> bool:
    """Delete the rule; False if there was none with that id."""
    try:
        with db.connect(settings) as conn:
            return conn.execute(db.sql_text(settings, "delete_rule"), {"rule_id": rule_id}).fetchone() is not None
    except psycopg.errors.UndefinedTable:
        raise _missing_table() from None


def rule_status(rule: Rule, at: datetime) -> str:
    if rule.in_force(at):
        return "in force"
    return "scheduled" if rule.valid_from is not None and at < rule.valid_from else "expired"


# --- what publish and the API apply ------------------------------------------------------------


@dataclass(frozen=True)
class RuleSnapshot:
    """The rules in force at ``taken_at`` and the product and user sets they need."""

    taken_at: datetime
    rules: tuple[Rule, ...] = ()
    attribute_matches: dict[int, tuple[str, ...]] = field(default_factory=dict)  # rule_id -> products
    inactive_products: frozenset[str] = frozenset()  # inactive in the catalogue now
    segments: dict[str, frozenset[str]] = field(default_factory=dict)  # segment -> user ids

    def ordering_fingerprint(self) -> str:
        """Same value <=> the same ordering rules for the same users. A published list carries the
        value it was made with; the API ranks on request while the value in force differs."""
        ordering = sorted((r.ordering_key() for r in self.rules if r.kind in ORDERING_KINDS), key=lambda r: r["rule_id"] or 0)
        named = sorted({r["segment"] for r in ordering if r["segment"] is not None})
        digest = hashlib.sha256(json.dumps(ordering, sort_keys=True, default=str).encode())
        for segment in named:
            digest.update(f"\0{segment}\0".encode())
            digest.update("\0".join(sorted(self.segments.get(segment, ()))).encode())
        return digest.hexdigest()[:16]

    @cached_property
    def exclusion_fingerprint(self) -> str:
        """Same value <=> the same products kept out of the same users' lists: the exclude rules,
        the products their attributes match, the catalogue's inactive products, and the members of
        the segments exclude rules name. A published list made with this value needs no filtering
        while it is in force."""
        excludes = sorted((r.ordering_key() for r in self.rules if r.kind == "exclude"), key=lambda r: r["rule_id"] or 0)
        matched = {str(r["rule_id"]): sorted(self.attribute_matches.get(r["rule_id"], ())) for r in excludes}
        named = sorted({r["segment"] for r in excludes if r["segment"] is not None})
        members = {segment: sorted(self.segments.get(segment, ())) for segment in named}
        content = [excludes, matched, sorted(self.inactive_products), members]
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "taken_at": self.taken_at.isoformat(),
            "rules": [rule.to_dict() for rule in self.rules],
            "attribute_matches": {str(k): list(v) for k, v in self.attribute_matches.items()},
            "inactive_products": sorted(self.inactive_products),
            "segments": {name: sorted(users) for name, users in self.segments.items()},
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RuleSnapshot:
        return cls(
            taken_at=datetime.fromisoformat(values["taken_at"]),
            rules=tuple(Rule.from_dict(rule) for rule in values["rules"]),
            attribute_matches={int(k): tuple(v) for k, v in values["attribute_matches"].items()},
            inactive_products=frozenset(values["inactive_products"]),
            segments={name: frozenset(users) for name, users in values["segments"].items()},
        )


NO_RULES_FINGERPRINT = RuleSnapshot(datetime.fromtimestamp(0, UTC)).ordering_fingerprint()


def take_snapshot(settings: Settings, at: datetime | None = None) -> RuleSnapshot:
    """The rules in force now (or ``at``), with what they need from the catalogue and segments."""
    at = at or datetime.now(UTC)
    try:
        with db.connect(settings) as conn:
            rules = tuple(_rule(row) for row in conn.execute(db.sql_text(settings, "rules_in_force"), {"at": at}))
            matches = {
                rule.rule_id: tuple(
                    row[0] for row in conn.execute(
                        db.sql_text(settings, "products_with_attribute"),
                        {"attribute": rule.attribute, "value": json.dumps(rule.attribute_value)},
                    )
                )
                for rule in rules if rule.attribute is not None
            }
            inactive = frozenset(row[0] for row in conn.execute(db.sql_text(settings, "inactive_products")))
            named = sorted({rule.segment for rule in rules if rule.segment is not None})
            members: dict[str, set[str]] = {name: set() for name in named}
            if named:
                for segment, user_id in conn.execute(db.sql_text(settings, "segment_members"), {"segments": named}):
                    members[segment].add(user_id)
    except psycopg.errors.UndefinedTable:
        raise _missing_table() from None
    return RuleSnapshot(at, rules, matches, inactive, {name: frozenset(users) for name, users in members.items()})
