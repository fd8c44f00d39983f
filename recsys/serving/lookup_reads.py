"""Blocking PostgreSQL reads of the look-up page: product names, the pipeline's run history (and
which run an Airflow DAG run evaluated), the merchandising rules and the running (or last)
experiment with its analysis.

Both only decorate what Redis says, so callers treat any failure as "not available" and the page
shows ids only, or no chart. A short connect timeout keeps an unreachable database from holding
the page.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

import numpy as np

from recsys.core import db, experiments
from recsys.core.rules import list_rules, rule_status, take_snapshot
from recsys.core.settings import Settings
from recsys.ml.experiment_analysis import UserDays, analyse
from recsys.ml.merchandising import Merchandising

CONNECT_TIMEOUT_SECONDS = 3


def product_labels(settings: Settings, product_ids: Iterable[str]) -> dict[str, dict]:
    """``{product_id: {"name", "category"}}`` for the ids found in ``products`` (ids as text)."""
    wanted = sorted({str(product_id) for product_id in product_ids})
    if not wanted:
        return {}
    with db.connect(settings, connect_timeout=CONNECT_TIMEOUT_SECONDS) as conn:
        rows = conn.execute(db.sql_text(settings, "product_labels"), {"product_ids": wanted}).fetchall()
    return {product_id: {"name": name, "category": category} for product_id, name, category in rows}


def recent_runs(settings: Settings, limit: int) -> list[dict] | None:
    """The latest ``limit`` rows of ``recsys_runs`` (by recording time) in date order: by window end,
    then recording time; None if the table does not exist.

    Rows come as JSON objects (``to_jsonb``), so columns the pipeline adds later (a report link)
    arrive too and a missing one is simply absent."""
    with db.connect(settings, connect_timeout=CONNECT_TIMEOUT_SECONDS) as conn:
        [exists] = conn.execute(db.sql_text(settings, "runs_table_exists")).fetchone()
        if not exists:
            return None
        return [row for (row,) in conn.execute(db.sql_text(settings, "recent_runs_json"), {"limit": limit}).fetchall()]


def run_key_of(settings: Settings, dag_run_id: str) -> str | None:
    """The run folder the Airflow DAG run ``dag_run_id`` evaluated; None if it recorded none (or
    before ``recsys_runs`` exists)."""
    with db.connect(settings, connect_timeout=CONNECT_TIMEOUT_SECONDS) as conn:
        [exists] = conn.execute(db.sql_text(settings, "runs_table_exists")).fetchone()
        if not exists:
            return None
        row = conn.execute(db.sql_text(settings, "run_of_dag_run"), {"dag_run_id": dag_run_id}).fetchone()
    return None if row is None else row[0]


def rules_touching(settings: Settings, user_id: str, product_ids: Iterable[str]) -> dict[str, list[str]]:
    """Per product, the merchandising rules in force for this user that target it (by product,
    category or attribute), as ``#id description`` lines."""
    snapshot = take_snapshot(settings)
    wanted = [str(product_id) for product_id in product_ids]
    labels = product_labels(settings, wanted)
    # the listed products as the catalogue: targets and segments matched as publish and the API match them
    categories = np.array([labels.get(product, {}).get("category") for product in wanted], dtype=object)
    merchandising = Merchandising(snapshot, wanted, categories)
    applying = [rule for rule in merchandising.for_user(user_id).rules if rule.scope_category is None]
    return {
        product: [f"#{rule.rule_id} {rule.describe()}" for rule in applying if index in merchandising.targets(rule)]
        for index, product in enumerate(wanted)
    }


def rules_table(settings: Settings) -> list[dict]:
    """Every rule with its status now, oldest first."""
    now = datetime.now(UTC)
    return [{**rule.to_dict(), "description": rule.describe(), "status": rule_status(rule, now)} for rule in list_rules(settings)]


def shown_experiment(settings: Settings, now: datetime) -> experiments.Experiment | None:
    """The experiment running now, else the last one started, else the next one scheduled."""
    found = experiments.list_experiments(settings)  # latest start first
    return (
        next((e for e in found if e.running(now)), None)
        or next((e for e in found if e.starts_at is not None and e.starts_at <= now), None)
        or (found[-1] if found else None)
    )


def experiment_overview(settings: Settings, user_id: str | None = None) -> dict:
    """The shown experiment's analysis as ``recsys experiments report NAME --no-act`` computes it
    now (the same code: the numbers agree), and ``user_id``'s variant in it now."""
    now = datetime.now(UTC)
    experiment = shown_experiment(settings, now)
    if experiment is None:
        return {"experiment": None, "user": None}
    end = experiment.analysed_until(now)
    result = analyse(experiment, UserDays.from_rows(experiments.user_day_rows(settings, experiment, end)), end)
    result["decisions"] = [
        {**row, "decided_at": row["decided_at"].isoformat()} for row in experiments.guardrail_decisions(settings, experiment.name)
    ]
    user = None
    if user_id:
        assignment = experiment.assign(user_id, now)
        user = {"user_id": user_id, "variant": assignment.variant, "enrolled": assignment.enrolled}
    return {"experiment": result, "user": user}
