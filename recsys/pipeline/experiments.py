"""The analysis of an experiment acted on (``recsys experiments report NAME``, the daily DAG's
``analyse_experiment`` task; docs/experiments.md): the analysis of recsys.ml.experiment_analysis
on the experiment's exposures and outcome events read from Postgres, and the guardrails' stops,
recorded in Postgres.

Input: ``recommendation_exposures`` (one row per list served) and the events that carry a list's
``recommendation_id`` (sql/experiment_user_days.sql; what counts is set in recsys.core.experiments).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from recsys.core import experiments
from recsys.core.errors import InputError
from recsys.core.experiments import Experiment, GuardrailStop
from recsys.core.settings import Settings
from recsys.ml.experiment_analysis import UserDays, analyse


def read_user_days(settings: Settings, experiment: Experiment, end: datetime) -> UserDays:
    return UserDays.from_rows(experiments.user_day_rows(settings, experiment, end))


def report(settings: Settings, name: str, now: datetime | None = None, act: bool = True) -> dict[str, Any]:
    """Analyse the experiment's exposures up to ``now`` (or its end); with ``act``, stop every
    variant a guardrail found significantly worse and record the decision. The report lists every
    decision recorded so far."""
    now = now or datetime.now(UTC)
    experiment = experiments.get_experiment(settings, name)
    end = experiment.analysed_until(now)
    result = analyse(experiment, read_user_days(settings, experiment, end), end)
    result["stopped_now"] = []
    if act:
        for check in result["guardrails"]:
            if check["decision"] != "stop":
                continue
            lift = check["lift"]
            stop = GuardrailStop(
                experiment=name, variant=check["variant"], metric=check["metric"], lift=lift["value"],
                lift_low=lift["low"], lift_high=lift["high"], max_drop=check["max_drop"],
                reason=(
                    f"guardrail {check['metric']}: lift {lift['value']:+.1%} "
                    f"(95 % interval {lift['low']:+.1%} .. {lift['high']:+.1%}) is below -{check['max_drop']:.1%}"
                ),
            )
            if experiments.record_guardrail_stop(settings, stop, now):
                check["decision"] = "stopped"
                result["stopped_now"].append(check["variant"])
                experiment = experiments.get_experiment(settings, name)
    result["decisions"] = [
        {**row, "decided_at": row["decided_at"].isoformat()} for row in experiments.guardrail_decisions(settings, name)
    ]
    result["definition"] = experiment.to_dict()
    return result



def report_running(settings: Settings, now: datetime | None = None) -> dict[str, Any] | None:
    """The acting report of the experiment running at ``now``; None when none runs (also when the
    shop database has no experiments tables yet: then none can run)."""
    now = now or datetime.now(UTC)
    try:
        running = experiments.running_experiment(settings, now)
    except InputError:  # no experiments tables (`recsys init-db` not run since the upgrade)
        return None
    return None if running is None else report(settings, running.name, now, act=True)


def summary_line(result: dict[str, Any]) -> str:
    """One line: per variant exposed users and the primary metric (its lift for the treatments),
    the sample-ratio check and the guardrails' stops."""
    metric = result["primary_metric"]
    parts = []
    for variant in result["variants"]:
        value = variant[metric]["value"]
        text = f"{variant['name']} {variant['exposed_users']} users {metric} " + ("n/a" if value is None else f"{value:.4f}")
        lift = (variant["lift"] or {}).get(metric)
        if lift and lift["value"] is not None:
            text += f" (lift {lift['value']:+.1%}, {lift['low']:+.1%} .. {lift['high']:+.1%})"
        parts.append(text)
    srm = result["srm"]
    stopped = sorted({check["variant"] for check in result["guardrails"] if check["decision"] == "stopped"})
    return (
        f"experiment {result['experiment']} ({result['status']}): {'; '.join(parts)}; sample ratio p = "
        f"{srm['p_value']:.3g}{' ALARM' if srm['alarm'] else ''}; stopped: {', '.join(stopped) or 'none'}"
    )


def alerts(result: dict[str, Any]) -> list[str]:
    """What an operator must hear of: each variant this report stopped, and a sample-ratio alarm."""
    found = []
    reasons = {row["variant"]: row["reason"] for row in result["decisions"]}
    for variant in result["stopped_now"]:
        found.append(
            f"experiment {result['experiment']}: guardrail stopped variant {variant!r}: {reasons.get(variant)}; "
            "its users get the control from now on (served from this run's publish)"
        )
    srm = result["srm"]
    if srm["alarm"]:
        found.append(
            f"experiment {result['experiment']}: sample-ratio mismatch (p = {srm['p_value']:.2g} < {srm['threshold']}): "
            f"users per variant {srm['observed']} against expected {_rounded(srm['expected'])}; exposures are "
            "logged under wrong variants or lost for some: its results cannot be trusted until that is found"
        )
    return found


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 1) for name, value in values.items()}
