"""Blocking PostgreSQL reads of the look-up page: product names, the pipeline's run history (and
which run an Airflow DAG run evaluated) and the merchandising rules.

Both only decorate what Redis says, so callers treat any failure as "not available" and the page
shows ids only, or no chart. A short connect timeout keeps an unreachable database from holding
the page.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

import numpy as np

from recsys.core import db
from recsys.core.rules import list_rules, rule_status, take_snapshot
from recsys.core.settings import Settings
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
