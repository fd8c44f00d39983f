"""A/B tests of recommendation variants: what an experiment is, how it is validated, which
variant a user gets, and the shop's ``experiments`` tables (``recsys experiments start|list|stop``;
docs/experiments.md).

An experiment has 2+ variants, each a set of overrides of :class:`PipelineParams` and a share of
the users; the first variant is the control. A user's variant is a salted hash of (experiment,
user id), so publish, the API and the analysis all reach the same answer without storing
anything per user (:meth:`Experiment.assign`, the one home of that rule). Users outside the
variants' shares, everyone outside the experiment's running time, and the users of a variant a
guardrail stopped get the control and are not part of the experiment.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args

import psycopg

from recsys.core import db
from recsys.core.errors import InputError
from recsys.core.params import DATA_PARAMS, RUN_WIDE_PARAMS, SERVE_TIME_PARAMS, TRAINING_PARAMS, PipelineParams
from recsys.core.settings import Settings

Metric = Literal["click_through", "conversion"]
METRICS: tuple[str, ...] = get_args(Metric)
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
MAX_REASON_LENGTH = 500
# shares are compared to the hash's position in [0, 1): they sum to at most 1, with room for the
# float rounding of e.g. 0.1 + 0.2 + 0.7
SHARE_TOLERANCE = 1e-9
_HASH_SPAN = float(2**64)
# What counts as an outcome of a served list (the analysis reads it; the API will log by it): an
# event carrying the list's recommendation_id, by its user, on one of its products, within the
# window after serving. Any of these event types means the shopper followed the list (a click);
# a purchase is a conversion.
CLICK_EVENT_TYPES = ("view", "add_to_cart", "purchase")
CONVERSION_EVENT_TYPES = ("purchase",)
ATTRIBUTION_WINDOW = timedelta(hours=24)
# a guardrail acts only once both sides have this many exposed users: fewer make the normal
# approximation of the lift's interval unreliable
MIN_USERS_FOR_DECISION = 100


def _name_problem(what: str, name: object) -> str | None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        return f"{what} {str(name)[:70]!r} must be 1 to 63 of a-z 0-9 _ . - (starting with a letter or digit)"
    return None


@dataclass(frozen=True)
class Variant:
    name: str
    share: float
    params: dict[str, Any] = field(default_factory=dict)  # overrides of PipelineParams
    stopped_at: datetime | None = None
    stop_reason: str | None = None

    def problems(self) -> list[str]:
        found = []
        problem = _name_problem("variant name", self.name)
        if problem:
            found.append(problem)
        if isinstance(self.share, bool) or not isinstance(self.share, int | float) or not 0 < self.share <= 1:
            found.append(f"variant {self.name!r} share must be in (0, 1], got {self.share!r}")
        try:
            PipelineParams.from_dict(self.params)
        except InputError as error:
            found.append(f"variant {self.name!r} params: {error}")
        except (TypeError, ValueError, AttributeError) as error:  # e.g. event_weights given as a list
            found.append(f"variant {self.name!r} params {json.dumps(self.params)[:120]}: {error}")
        return found

    def pipeline_params(self, base: PipelineParams) -> PipelineParams:
        """``base`` with this variant's overrides."""
        return PipelineParams.from_dict({**base.to_dict(), **self.params})

    def trains_own_model(self, base: PipelineParams) -> bool:
        """Whether the variant's training params differ from ``base``'s: then train fits it a
        model of its own (serve-time params alone are applied at publish, on the run's model)."""
        applied = self.pipeline_params(base)
        return any(getattr(applied, name) != getattr(base, name) for name in TRAINING_PARAMS)

    def serving_problems(self, control: bool) -> list[str]:
        """Why publish could not serve this variant: the params no variant may override."""
        if control and self.params:
            return [f"variant {self.name!r} is the control (the first variant): it serves the run's params, as every "
                    f"user outside the experiment gets them, so it takes no overrides, got {', '.join(self.params)}"]
        found = []
        for group, why in ((DATA_PARAMS, "data params (the window and matrix all variants share)"),
                           (RUN_WIDE_PARAMS, "run-wide params (product pages, evaluation, quality gate)")):
            named = sorted(group & set(self.params))
            if named:
                found.append(f"variant {self.name!r} overrides {', '.join(named)}: {why} cannot differ between variants")
        return found


@dataclass(frozen=True)
class Guardrail:
    """Stop a variant whose ``metric`` is significantly worse than the control's: the upper end
    of the 95 % interval of its relative lift below ``-max_drop``."""

    metric: Metric
    max_drop: float = 0.0

    def problems(self) -> list[str]:
        found = []
        if self.metric not in METRICS:
            found.append(f"guardrail metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if isinstance(self.max_drop, bool) or not isinstance(self.max_drop, int | float) or not 0 <= self.max_drop < 1:
            found.append(f"guardrail {self.metric} max_drop must be in [0, 1), got {self.max_drop!r}")
        return found

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "max_drop": self.max_drop}


@dataclass(frozen=True)
class Assignment:
    variant: str
    enrolled: bool  # False: outside the experiment (the control, not counted in its analysis)


@dataclass(frozen=True)
class Experiment:
    name: str
    variants: tuple[Variant, ...]
    primary_metric: Metric = "click_through"
    guardrails: tuple[Guardrail, ...] = ()
    starts_at: datetime | None = None  # None when defined: starts when stored
    ends_at: datetime | None = None
    salt: str = ""  # "" when defined: a random one is drawn when stored
    stopped_at: datetime | None = None
    stop_reason: str | None = None
    created_at: datetime | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        problem = _name_problem("experiment name", self.name)
        if problem:
            problems.append(problem)
        if len(self.variants) < 2:
            problems.append(f"an experiment needs 2 or more variants, got {len(self.variants)}")
        names = [variant.name for variant in self.variants]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            problems.append(f"variant names must differ, repeated: {', '.join(duplicates)}")
        for variant in self.variants:
            problems += variant.problems()
        shares = [variant.share for variant in self.variants if isinstance(variant.share, int | float)]
        if sum(shares) > 1 + SHARE_TOLERANCE:
            problems.append(f"variant shares must sum to at most 1, got {' + '.join(f'{s:g}' for s in shares)} = {sum(shares):g}")
        if self.primary_metric not in METRICS:
            problems.append(f"primary_metric must be one of {', '.join(METRICS)}, got {self.primary_metric!r}")
        guarded = [guardrail.metric for guardrail in self.guardrails]
        if len(set(guarded)) < len(guarded):
            problems.append(f"one guardrail per metric, got {', '.join(guarded)}")
        for guardrail in self.guardrails:
            problems += guardrail.problems()
        for name in ("starts_at", "ends_at", "stopped_at"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is None:
                object.__setattr__(self, name, value.replace(tzinfo=UTC))  # naive times are UTC
        if self.starts_at and self.ends_at and self.ends_at <= self.starts_at:
            problems.append(f"end {self.ends_at.isoformat()} is not after start {self.starts_at.isoformat()}")
        if self.stop_reason is not None and len(self.stop_reason) > MAX_REASON_LENGTH:
            problems.append(f"stop reason is longer than {MAX_REASON_LENGTH} characters")
        if problems:
            raise InputError(f"invalid experiment {str(self.name)[:70]!r}: " + "; ".join(problems))

    @property
    def control(self) -> Variant:
        return self.variants[0]

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise InputError(f"experiment {self.name!r} has no variant {name!r}; it has {', '.join(v.name for v in self.variants)}")

    def running(self, at: datetime) -> bool:
        return (
            (self.stopped_at is None or at < self.stopped_at)
            and (self.starts_at is None or self.starts_at <= at)
            and (self.ends_at is None or at < self.ends_at)
        )

    def status(self, at: datetime) -> str:
        if self.stopped_at is not None and self.stopped_at <= at:
            return "stopped"
        if self.starts_at is not None and at < self.starts_at:
            return "scheduled"
        return "ended" if self.ends_at is not None and self.ends_at <= at else "running"

    def analysed_until(self, now: datetime) -> datetime:
        """The end of what an analysis at ``now`` reads: now, or the end or stop if earlier."""
        return min([now, *(t for t in (self.ends_at, self.stopped_at) if t is not None)])

    def position(self, user_id: str) -> float:
        """The user's place in [0, 1): a keyed BLAKE2b hash of the experiment's name and the user
        id under the experiment's salt, so two experiments split the users independently."""
        digest = hashlib.blake2b(
            f"{self.name}\x00{user_id}".encode(), key=self.salt.encode(), digest_size=8
        ).digest()
        return int.from_bytes(digest, "big") / _HASH_SPAN

    def hashed_variant(self, user_id: str) -> Variant | None:
        """The variant whose share holds the user's position; None outside every share. Ignores
        time and stops: what the hash alone says."""
        position, upper = self.position(user_id), 0.0
        for variant in self.variants:
            upper += variant.share
            if position < upper:
                return variant
        return None

    def assign(self, user_id: str, at: datetime) -> Assignment:
        """The variant the user gets at ``at``: the control, not enrolled, outside the running time,
        outside the shares, or in a variant a guardrail had stopped by then."""
        variant = self.hashed_variant(user_id) if self.running(at) else None
        if variant is None or (variant.stopped_at is not None and variant.stopped_at <= at):
            return Assignment(self.control.name, enrolled=False)
        return Assignment(variant.name, enrolled=True)

    def to_dict(self) -> dict[str, Any]:
        def when(value: datetime | None) -> str | None:
            return None if value is None else value.isoformat()

        return {
            "name": self.name,
            "primary_metric": self.primary_metric,
            "guardrails": [guardrail.to_dict() for guardrail in self.guardrails],
            "starts_at": when(self.starts_at), "ends_at": when(self.ends_at),
            "stopped_at": when(self.stopped_at), "stop_reason": self.stop_reason, "created_at": when(self.created_at),
            "variants": [
                {"name": v.name, "share": v.share, "params": v.params, "control": v is self.control,
                 "stopped_at": when(v.stopped_at), "stop_reason": v.stop_reason}
                for v in self.variants
            ],
        }

    def snapshot(self) -> dict[str, Any]:
        """What a published version records of the experiment it serves (its meta's
        ``experiment``): :meth:`to_dict` with the salt, so the API assigns users as publish did.
        Never shown to shoppers (the salt keeps the split unpredictable)."""
        return {**self.to_dict(), "salt": self.salt}

    @classmethod
    def from_snapshot(cls, snapshot: dict[str, Any]) -> Experiment:
        def when(value: str | None) -> datetime | None:
            return None if value is None else datetime.fromisoformat(value)

        return cls(
            name=snapshot["name"], salt=snapshot["salt"], primary_metric=snapshot["primary_metric"],
            guardrails=tuple(Guardrail(g["metric"], g["max_drop"]) for g in snapshot["guardrails"]),
            starts_at=when(snapshot["starts_at"]), ends_at=when(snapshot["ends_at"]),
            stopped_at=when(snapshot["stopped_at"]), stop_reason=snapshot["stop_reason"],
            created_at=when(snapshot["created_at"]),
            variants=tuple(
                Variant(v["name"], v["share"], v["params"], when(v["stopped_at"]), v["stop_reason"])
                for v in snapshot["variants"]
            ),
        )


def parse_variant(text: str) -> tuple[str, float]:
    """``diverse:0.5`` -> ("diverse", 0.5)."""
    name, sep, share = text.rpartition(":")
    try:
        if not sep:
            raise ValueError
        return name, float(share)
    except ValueError:
        raise InputError(f"--variant {text[:70]!r} must be NAME:SHARE, e.g. diverse:0.5") from None


def parse_override(text: str) -> tuple[str, str, Any]:
    """``diverse.diversity_lambda=0.3`` -> ("diverse", "diversity_lambda", 0.3): the value is read
    as JSON if it is JSON, else as a string (as ``--param`` reads it)."""
    target, sep, raw = text.partition("=")
    variant, dot, param = target.partition(".")
    if not sep or not dot or not variant or not param:
        raise InputError(f"--set {text[:70]!r} must be VARIANT.PARAM=VALUE, e.g. diverse.diversity_lambda=0.3")
    try:
        return variant, param, json.loads(raw)
    except json.JSONDecodeError:
        return variant, param, raw


def parse_guardrail(text: str) -> Guardrail:
    """``conversion`` or ``conversion:0.05`` (stop when significantly worse by more than 5 %)."""
    metric, sep, raw = text.partition(":")
    try:
        max_drop = float(raw) if sep else 0.0
    except ValueError:
        raise InputError(f"--guardrail {text[:70]!r} must be METRIC[:MAX_DROP], e.g. conversion:0.05") from None
    guardrail = Guardrail(metric.replace("-", "_"), max_drop)  # type: ignore[arg-type]
    problems = guardrail.problems()
    if problems:
        raise InputError("; ".join(problems))
    return guardrail


def experiment_from_options(
    name: str, variants: list[str], overrides: list[str], primary_metric: str, guardrails: list[str] | None,
    starts_at: datetime | None, ends_at: datetime | None,
) -> Experiment:
    """An experiment from the command's options (``--variant NAME:SHARE``, ``--set
    VARIANT.PARAM=VALUE``, ``--guardrail METRIC[:MAX_DROP]``). Without guardrails, the primary
    metric guards: a variant significantly worse on it is stopped."""
    shares = [parse_variant(text) for text in variants]
    params: dict[str, dict[str, Any]] = {variant: {} for variant, _ in shares}
    for text in overrides:
        variant, param, value = parse_override(text)
        if variant not in params:
            raise InputError(f"--set {text[:70]!r} names variant {variant!r}, not one of --variant: {', '.join(params)}")
        params[variant][param] = value
    metric = primary_metric.replace("-", "_")
    chosen = [parse_guardrail(text) for text in guardrails] if guardrails else [Guardrail(metric)]  # type: ignore[arg-type]
    return Experiment(
        name=name, variants=tuple(Variant(variant, share, params[variant]) for variant, share in shares),
        primary_metric=metric, guardrails=tuple(chosen), starts_at=starts_at, ends_at=ends_at,  # type: ignore[arg-type]
    )


# --- the tables --------------------------------------------------------------------------------


def _missing_tables() -> InputError:
    return InputError("the shop database has no experiments tables: run `recsys init-db` (idempotent)")


def _experiment(row: tuple, variant_rows: list[tuple]) -> Experiment:
    name, salt, metric, guardrails, starts_at, ends_at, stopped_at, stop_reason, created_at = row
    return Experiment(
        name=name, salt=salt, primary_metric=metric,
        guardrails=tuple(Guardrail(g["metric"], g["max_drop"]) for g in guardrails),
        starts_at=starts_at, ends_at=ends_at, stopped_at=stopped_at, stop_reason=stop_reason, created_at=created_at,
        variants=tuple(
            Variant(name=v[0], share=v[1], params=v[2], stopped_at=v[3], stop_reason=v[4]) for v in variant_rows
        ),
    )


def _load(conn: psycopg.Connection, settings: Settings, name: str) -> Experiment | None:
    row = conn.execute(db.sql_text(settings, "experiment_by_name"), {"name": name}).fetchone()
    if row is None:
        return None
    variants = conn.execute(db.sql_text(settings, "experiment_variants"), {"name": name}).fetchall()
    return _experiment(row, variants)


def start_experiment(settings: Settings, experiment: Experiment, now: datetime | None = None) -> Experiment:
    """Store a new experiment (starting ``now`` unless it names a start). Refused if the name is
    taken or another experiment runs at any time the new one would: a user's list is scored with
    one variant's params, so two experiments at once could not both be served."""
    now = now or datetime.now(UTC)
    unservable = [problem for v in experiment.variants for problem in v.serving_problems(v is experiment.control)]
    if unservable:
        raise InputError(
            f"invalid experiment {experiment.name!r}: " + "; ".join(unservable) + f" (variants may override "
            f"serve-time params: {', '.join(sorted(SERVE_TIME_PARAMS))}; or training params, which train an extra "
            f"model: {', '.join(sorted(TRAINING_PARAMS))})"
        )
    stored = replace(experiment, starts_at=experiment.starts_at or now, salt=experiment.salt or secrets.token_hex(16))
    if stored.ends_at is not None and stored.ends_at <= now:
        raise InputError(f"end {stored.ends_at.isoformat()} is in the past: the experiment would never run")
    try:
        with db.connect(settings) as conn:
            # one start at a time: the overlap check and the insert see the same experiments
            conn.execute(db.sql_text(settings, "lock_experiments"))
            if _load(conn, settings, stored.name) is not None:
                raise InputError(f"experiment name {stored.name!r} is taken (names are never reused: pick another)")
            overlapping = conn.execute(
                db.sql_text(settings, "overlapping_experiments"),
                {"starts_at": stored.starts_at, "ends_at": stored.ends_at, "now": now},
            ).fetchone()
            if overlapping is not None:
                raise InputError(
                    f"experiment {overlapping[0]!r} runs at the same time (until "
                    f"{'stopped' if overlapping[1] is None else overlapping[1].isoformat()}): stop it first "
                    f"(`recsys experiments stop {overlapping[0]}`) or start after it ends"
                )
            created_at = conn.execute(
                db.sql_text(settings, "insert_experiment"),
                {
                    "name": stored.name, "salt": stored.salt, "primary_metric": stored.primary_metric,
                    "guardrails": json.dumps([g.to_dict() for g in stored.guardrails]),
                    "starts_at": stored.starts_at, "ends_at": stored.ends_at,
                },
            ).fetchone()[0]
            for position, variant in enumerate(stored.variants):
                conn.execute(
                    db.sql_text(settings, "insert_experiment_variant"),
                    {"experiment": stored.name, "position": position, "name": variant.name, "share": variant.share,
                     "params": json.dumps(variant.params)},
                )
    except psycopg.errors.UndefinedTable:
        raise _missing_tables() from None
    return replace(stored, created_at=created_at)


def get_experiment(settings: Settings, name: str) -> Experiment:
    try:
        with db.connect(settings) as conn:
            found = _load(conn, settings, name)
    except psycopg.errors.UndefinedTable:
        raise _missing_tables() from None
    if found is None:
        raise InputError(f"no experiment named {name[:70]!r} (`recsys experiments list` shows them)")
    return found


def list_experiments(settings: Settings) -> list[Experiment]:
    try:
        with db.connect(settings) as conn:
            names = [row[0] for row in conn.execute(db.sql_text(settings, "experiment_names")).fetchall()]
            return [_load(conn, settings, name) for name in names]  # type: ignore[misc]
    except psycopg.errors.UndefinedTable:
        raise _missing_tables() from None


def running_experiment(settings: Settings, at: datetime) -> Experiment | None:
    """The experiment running at ``at``, if any (at most one runs at a time)."""
    for experiment in list_experiments(settings):
        if experiment.running(at):
            return experiment
    return None


def stop_experiment(settings: Settings, name: str, reason: str | None, now: datetime | None = None) -> Experiment:
    """Stop it now: from then on everyone gets the control. Stopping a stopped one is an error."""
    if reason is not None and len(reason) > MAX_REASON_LENGTH:
        raise InputError(f"stop reason is longer than {MAX_REASON_LENGTH} characters")
    experiment = get_experiment(settings, name)
    if experiment.stopped_at is not None:
        raise InputError(f"experiment {name!r} was stopped already, at {experiment.stopped_at.isoformat()}")
    now = now or datetime.now(UTC)
    with db.connect(settings) as conn:
        conn.execute(db.sql_text(settings, "stop_experiment"), {"name": name, "stopped_at": now, "reason": reason})
    return replace(experiment, stopped_at=now, stop_reason=reason)


@dataclass(frozen=True)
class GuardrailStop:
    """A guardrail's decision that a variant is significantly worse than the control."""

    experiment: str
    variant: str
    metric: str
    lift: float
    lift_low: float
    lift_high: float
    max_drop: float
    reason: str


def record_guardrail_stop(settings: Settings, stop: GuardrailStop, now: datetime | None = None) -> bool:
    """Stop the variant and record why, in one transaction; False if it was stopped already."""
    now = now or datetime.now(UTC)
    with db.connect(settings) as conn:
        stopped = conn.execute(
            db.sql_text(settings, "stop_variant"),
            {"experiment": stop.experiment, "variant": stop.variant, "stopped_at": now, "reason": stop.reason},
        ).fetchone()
        if stopped is None:
            return False
        conn.execute(db.sql_text(settings, "insert_experiment_decision"), {**stop.__dict__, "decided_at": now})
    return True


def user_day_rows(settings: Settings, experiment: Experiment, end: datetime) -> list[tuple]:
    """Per variant, user and UTC day of serving up to ``end``: (variant, user_id, day, lists,
    clicked, converted, first_served_at), outcomes counted as the constants above say."""
    with db.connect(settings) as conn:
        return conn.execute(
            db.sql_text(settings, "experiment_user_days"),
            {
                "experiment": experiment.name, "start": experiment.starts_at, "end": end,
                "click_types": list(CLICK_EVENT_TYPES), "conversion_types": list(CONVERSION_EVENT_TYPES),
                "window": ATTRIBUTION_WINDOW,
            },
        ).fetchall()


def guardrail_decisions(settings: Settings, name: str) -> list[dict[str, Any]]:
    with db.connect(settings) as conn:
        cursor = conn.execute(db.sql_text(settings, "experiment_decisions"), {"experiment": name})
        columns = [column.name for column in cursor.description]  # type: ignore[union-attr]
        return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
