"""The analysis of an experiment's exposures and outcomes, without touching the database
(docs/experiments.md#statistics): per variant, overall and per UTC day, the exposed users,
click-through and conversion with 95 % intervals, each variant's relative lift over the control,
the sample-ratio-mismatch check, and the guardrails' proposals (``keep``, ``stop``...).

Its input is one row per (variant, user, UTC day) as ``recsys.core.experiments.user_day_rows``
reads them. ``recsys experiments report`` and the daily DAG (recsys.pipeline.experiments, which
act on the guardrails) and the look-up page (recsys.serving, which only looks) share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from recsys.core import experiments
from recsys.core.experiments import Experiment
from recsys.ml.experiment_stats import rate, relative_lift, sample_ratio_check

RATES = {"click_through": "clicked", "conversion": "converted"}


@dataclass(frozen=True)
class UserDays:
    """One row per (variant, user, UTC day): lists served, clicked and converted that day."""

    variant: np.ndarray
    user_id: np.ndarray
    day: np.ndarray
    lists: np.ndarray
    clicked: np.ndarray
    converted: np.ndarray
    first_served_at: np.ndarray  # datetime64[us], UTC

    @classmethod
    def from_rows(cls, rows: list[tuple]) -> UserDays:
        columns = list(zip(*rows, strict=True)) if rows else [()] * 7
        return cls(
            variant=np.array(columns[0], dtype=object), user_id=np.array(columns[1], dtype=object),
            day=np.array(columns[2], dtype="datetime64[D]"), lists=np.array(columns[3], dtype=np.int64),
            clicked=np.array(columns[4], dtype=np.int64), converted=np.array(columns[5], dtype=np.int64),
            first_served_at=np.array([t.replace(tzinfo=None) for t in columns[6]], dtype="datetime64[us]"),
        )


def _per_user(data: UserDays, mask: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Sums per user of the rows in ``mask``: lists, and each rate's numerator."""
    users, index = np.unique(data.user_id[mask].astype(str), return_inverse=True)
    lists = np.bincount(index, weights=data.lists[mask], minlength=len(users))
    numerators = {
        metric: np.bincount(index, weights=getattr(data, column)[mask], minlength=len(users))
        for metric, column in RATES.items()
    }
    return lists, numerators


def _rates(lists: np.ndarray, numerators: dict[str, np.ndarray]) -> dict[str, Any]:
    return {metric: rate(numerators[metric], lists) for metric in RATES}


def analyse(experiment: Experiment, data: UserDays, end: datetime) -> dict[str, Any]:
    """The report, without touching the database (the guardrails' decisions are proposals here)."""
    overall: dict[str, dict[str, Any]] = {}
    variants = []
    for variant in experiment.variants:
        mask = data.variant == variant.name
        lists, numerators = _per_user(data, mask)
        overall[variant.name] = _rates(lists, numerators)
        days = []
        for day in np.unique(data.day[mask]):
            # a user-day is the unit within one day
            day_mask = mask & (data.day == day)
            day_rates = {metric: rate(getattr(data, column)[day_mask], data.lists[day_mask]) for metric, column in RATES.items()}
            days.append({
                "day": str(day), "exposed_users": int(day_mask.sum()), "lists": int(data.lists[day_mask].sum()),
                **{metric: estimate.to_dict() for metric, estimate in day_rates.items()},
            })
        variants.append({
            "name": variant.name, "control": variant is experiment.control, "share": variant.share,
            "params": variant.params, "stopped_at": None if variant.stopped_at is None else variant.stopped_at.isoformat(),
            "exposed_users": len(lists), "lists": int(lists.sum()),
            **{metric: estimate.to_dict() for metric, estimate in overall[variant.name].items()},
            "lift": None, "days": days,
        })
    control = experiment.control.name
    for entry in variants[1:]:
        entry["lift"] = {
            metric: relative_lift(overall[entry["name"]][metric], overall[control][metric]).to_dict() for metric in RATES
        }
    return {
        "experiment": experiment.name, "status": experiment.status(end), "analysed_until": end.isoformat(),
        "primary_metric": experiment.primary_metric,
        "attribution_hours": experiments.ATTRIBUTION_WINDOW.total_seconds() / 3600,
        "variants": variants,
        "srm": _sample_ratio(experiment, data),
        "users_in_several_variants": _users_in_several_variants(data),
        "guardrails": _guardrails(experiment, overall, end),
    }


def _sample_ratio(experiment: Experiment, data: UserDays) -> dict[str, Any]:
    """Users per variant against the shares. Counted among users first served before the first
    guardrail stop: after it, the stopped variant takes no new users and its share no longer holds."""
    stops = [v.stopped_at for v in experiment.variants if v.stopped_at is not None]
    counted = np.ones(len(data.lists), dtype=bool)
    if stops:
        counted = data.first_served_at < np.datetime64(min(stops).astimezone(UTC).replace(tzinfo=None), "us")
    observed = {
        v.name: len(np.unique(data.user_id[counted & (data.variant == v.name)].astype(str))) for v in experiment.variants
    }
    check = sample_ratio_check(observed, {v.name: v.share for v in experiment.variants})
    return {**check.to_dict(), "counted_before": None if not stops else min(stops).isoformat()}


def _users_in_several_variants(data: UserDays) -> int:
    """Stable assignment makes this 0; more means exposures were logged under a wrong variant."""
    pairs = {(str(user), variant) for user, variant in zip(data.user_id, data.variant, strict=True)}
    users = [user for user, _ in pairs]
    return len(users) - len(set(users))


def _guardrails(experiment: Experiment, overall: dict[str, dict[str, Any]], end: datetime) -> list[dict[str, Any]]:
    control = experiment.control.name
    checks = []
    for variant in experiment.variants[1:]:
        for guardrail in experiment.guardrails:
            treated, base = overall[variant.name][guardrail.metric], overall[control][guardrail.metric]
            lift = relative_lift(treated, base)
            if variant.stopped_at is not None and variant.stopped_at <= end:
                decision = "stopped"
            elif min(treated.units, base.units) < experiments.MIN_USERS_FOR_DECISION:
                decision = "too_few_users"
            elif lift.high < -guardrail.max_drop:
                decision = "stop"
            else:
                decision = "keep"
            checks.append({
                "variant": variant.name, "metric": guardrail.metric, "max_drop": guardrail.max_drop,
                "lift": lift.to_dict(), "decision": decision,
            })
    return checks
