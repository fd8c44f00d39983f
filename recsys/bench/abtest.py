"""``recsys bench abtest``: proof by simulation that the experiment analysis keeps its promises.

Simulated shoppers are split by the real assignment (:meth:`Experiment.assign`); each sees a few
recommendation lists over the test's days and follows one with a probability of their own (a
Beta-distributed propensity: some shoppers click far more than others), times ``1 + planted
lift`` in the treatment of an A/B test; a followed list is a ``view`` event carrying its
``recommendation_id``, and becomes a purchase with a fixed probability. The lists go to
``recommendation_exposures`` and the events to ``interactions`` with COPY, in a scratch schema of
the configured database (created and dropped by the run); every test is then analysed by
``recsys experiments report``'s own code, from those tables. Reported: the A/A tests' false
positive rate, the A/B tests' power at the planted lift and how often their 95 % intervals hold
it, and the sample-ratio alarms. This round's simulation writes the tables directly; driving it
through the API comes when the API serves variants (docs/experiments.md).
"""

from __future__ import annotations

import json
import math
import secrets
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console

from recsys.core import db, experiments
from recsys.core.experiments import Experiment, Guardrail, Variant
from recsys.core.settings import Settings
from recsys.ml.experiment_stats import Z_95
from recsys.pipeline.experiments import analyse, read_user_days

CATALOGUE = 200  # products a list is drawn from
LIST_LENGTH = 10
PURCHASE_GIVEN_CLICK = 0.2
PROPENSITY_CONCENTRATION = 20.0  # Beta(a, b) with a + b this: the spread of shoppers' propensities
FIRST_DAY = datetime(2026, 1, 5, tzinfo=UTC)
COPRIME_STRIDES = np.array([step for step in range(1, CATALOGUE) if np.gcd(step, CATALOGUE) == 1])


def _experiment(index: int, kind: str, days: int, seed: int) -> Experiment:
    starts_at = FIRST_DAY + timedelta(days=index * days)  # one after the other: one runs at a time
    treatment = {} if kind == "aa" else {"diversity_lambda": 0.0}
    return Experiment(
        name=f"{kind}-{index:04d}", variants=(Variant("control", 0.5), Variant("treatment", 0.5, treatment)),
        primary_metric="click_through", guardrails=(Guardrail("click_through"),),
        starts_at=starts_at, ends_at=starts_at + timedelta(days=days), salt=f"bench-{seed}-{kind}-{index}",
    )


def _simulate(
    experiment: Experiment, rng: np.random.Generator, users: int, base_click_through: float, lift: float,
    lists_per_user: float,
) -> tuple[str, str]:
    """COPY text of the exposures and of the outcome events of one test."""
    start, end = experiment.starts_at, experiment.ends_at
    assert start is not None and end is not None
    user_ids = np.array([f"u{user}" for user in range(users)], dtype=object)
    assigned = [experiment.assign(user_id, start) for user_id in user_ids]
    enrolled = np.array([assignment.enrolled for assignment in assigned])
    variants = np.array([assignment.variant for assignment in assigned], dtype=object)
    a = base_click_through * PROPENSITY_CONCENTRATION
    chance = rng.beta(a, PROPENSITY_CONCENTRATION - a, users) * np.where(variants == "treatment", 1 + lift, 1.0)
    lists = np.where(enrolled, 1 + rng.poisson(lists_per_user - 1, users), 0)
    # one row per list served
    owner = np.repeat(np.arange(users), lists)
    count = len(owner)
    served_at = start.timestamp() + rng.uniform(0, (end - start).total_seconds(), count)
    clicked = rng.random(count) < np.minimum(chance[owner], 1.0)
    bought = clicked & (rng.random(count) < PURCHASE_GIVEN_CLICK)
    # LIST_LENGTH distinct products: a random first one and a stride coprime with the catalogue's size
    strides = rng.choice(COPRIME_STRIDES, count)
    products = (rng.integers(CATALOGUE, size=count)[:, None] + strides[:, None] * np.arange(LIST_LENGTH)) % CATALOGUE
    product_ids = np.array([f"p{product}" for product in range(CATALOGUE)], dtype=object)
    listed = ["{" + ",".join(row) + "}" for row in product_ids[products].tolist()]
    followed = product_ids[products[np.arange(count), rng.integers(LIST_LENGTH, size=count)]]
    viewed_at = served_at + rng.uniform(1, 3600, count)
    bought_at = viewed_at + rng.uniform(1, 3600, count)

    def when(seconds: np.ndarray) -> list[str]:
        return [f"{text}Z" for text in np.datetime_as_string((seconds * 1e6).astype("datetime64[us]"), unit="us")]

    served_text, viewed_text, bought_text = when(served_at), when(viewed_at), when(bought_at)
    exposures, events = [], []
    for row in range(count):
        user = owner[row]
        recommendation_id = f"{experiment.name}-{row}"
        exposures.append(
            f"{recommendation_id}\t{experiment.name}\t{variants[user]}\t{user_ids[user]}\t{served_text[row]}\t"
            f"{listed[row]}\n"
        )
        if clicked[row]:
            events.append(f"{user_ids[user]}\t{followed[row]}\tview\t\\N\t{viewed_text[row]}\t{recommendation_id}\n")
        if bought[row]:
            events.append(f"{user_ids[user]}\t{followed[row]}\tpurchase\t1\t{bought_text[row]}\t{recommendation_id}\n")
    return "".join(exposures), "".join(events)


def run_abtest(
    settings: Settings, aa_tests: int, ab_tests: int, users: int, planted_lift: float, base_click_through: float,
    lists_per_user: float, days: int, seed: int, progress: bool = False,
) -> dict[str, Any]:
    scratch = settings.model_copy(update={"db_schema": f"recsys_bench_abtest_{secrets.token_hex(4)}"})
    db.create_schema(scratch)
    rng = np.random.default_rng(seed)
    outcomes: dict[str, list[dict[str, Any]]] = {"aa": [], "ab": []}
    started = time.perf_counter()
    try:
        plan = [("aa", i) for i in range(aa_tests)] + [("ab", aa_tests + i) for i in range(ab_tests)]
        for done, (kind, index) in enumerate(plan, 1):
            experiment = experiments.start_experiment(scratch, _experiment(index, kind, days, seed), now=FIRST_DAY)
            exposure_rows, event_rows = _simulate(
                experiment, rng, users, base_click_through, 0.0 if kind == "aa" else planted_lift, lists_per_user
            )
            with db.connect(scratch) as conn, conn.cursor() as cursor:
                with cursor.copy(db.sql_text(scratch, "load_exposures")) as copy:
                    copy.write(exposure_rows)
                with cursor.copy(db.sql_text(scratch, "load_outcome_events")) as copy:
                    copy.write(event_rows)
            assert experiment.ends_at is not None
            result = analyse(experiment, read_user_days(scratch, experiment, experiment.ends_at), experiment.ends_at)
            treatment = result["variants"][1]
            outcomes[kind].append({
                "lift": treatment["lift"]["click_through"], "conversion_lift": treatment["lift"]["conversion"],
                "srm_alarm": result["srm"]["alarm"],
                "guardrail_stop": any(check["decision"] == "stop" for check in result["guardrails"]),
                "users": sum(v["exposed_users"] for v in result["variants"]),
            })
            if progress and done % 50 == 0:
                print(f"{done}/{len(plan)} tests analysed", file=sys.stderr)
    finally:
        db.drop_schema(scratch)
    aa, ab = outcomes["aa"], outcomes["ab"]

    def share(rows: list[dict[str, Any]], test) -> float | None:
        return None if not rows else sum(1 for row in rows if test(row)) / len(rows)

    def wilson(rows: list[dict[str, Any]], test) -> list[float] | None:
        """95 % Wilson interval of the share: how far the rate over this many tests may be from the true one."""
        if not rows:
            return None
        n, p = len(rows), share(rows, test)
        centre, half = (p + Z_95**2 / (2 * n)), Z_95 * math.sqrt(p * (1 - p) / n + Z_95**2 / (4 * n * n))
        return [round((centre - half) / (1 + Z_95**2 / n), 4), round((centre + half) / (1 + Z_95**2 / n), 4)]

    def significant(row: dict[str, Any]) -> bool:
        return row["lift"]["significant"]

    def found(row: dict[str, Any]) -> bool:
        return row["lift"]["significant"] and row["lift"]["value"] > 0

    return {
        "aa_tests": len(aa),
        "aa_false_positive_rate": share(aa, significant),
        "aa_false_positive_rate_interval": wilson(aa, significant),
        "ab_tests": len(ab),
        "power": share(ab, found),
        "power_interval": wilson(ab, found),
        "planted_lift": planted_lift,
        "ab_mean_measured_lift": None if not ab else float(np.mean([row["lift"]["value"] for row in ab])),
        "ab_interval_coverage": share(ab, lambda row: row["lift"]["low"] <= planted_lift <= row["lift"]["high"]),
        "conversion_power": share(ab, lambda row: row["conversion_lift"]["significant"] and row["conversion_lift"]["value"] > 0),
        "srm_alarms_in_aa": sum(row["srm_alarm"] for row in aa),
        "srm_alarms_in_ab": sum(row["srm_alarm"] for row in ab),
        "aa_guardrail_stops": sum(row["guardrail_stop"] for row in aa),
        "primary_metric": "click_through",
        "users_per_test": users, "mean_enrolled_users": float(np.mean([row["users"] for row in aa + ab])) if aa + ab else 0,
        "lists_per_user": lists_per_user, "base_click_through": base_click_through, "days": days, "seed": seed,
        "seconds": round(time.perf_counter() - started, 1),
    }


def abtest_command(
    aa_tests: Annotated[
        int, typer.Option(min=1, help="A/A tests (both variants alike); 1000 pin the false-positive rate to about ±0.014.")
    ] = 1000,
    ab_tests: Annotated[int, typer.Option(min=1, help="A/B tests with the planted lift.")] = 200,
    users: Annotated[int, typer.Option(min=10, help="Shoppers per test (half in each variant).")] = 4000,
    planted_lift: Annotated[float, typer.Option(min=0.0, help="Relative click-through lift of the treatment.")] = 0.2,
    base_click_through: Annotated[float, typer.Option(min=0.001, max=0.5, help="The control's mean click-through.")] = 0.1,
    lists_per_user: Annotated[float, typer.Option(min=1.0, help="Mean lists a shopper sees per test.")] = 3.0,
    days: Annotated[int, typer.Option(min=1, max=60, help="Days per test.")] = 7,
    seed: int = 42,
    json_output: Annotated[bool, typer.Option("--json", help="end stdout with one JSON object")] = False,
) -> None:
    """False-positive rate of A/A tests and power of A/B tests of the experiment analysis, on
    simulated shoppers (needs the shop's Postgres; works in a scratch schema it drops)."""
    result = run_abtest(
        Settings(), aa_tests, ab_tests, users, planted_lift, base_click_through, lists_per_user, days, seed, progress=True
    )
    if json_output:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    console = Console()
    console.print(
        f"A/A: {result['aa_tests']} tests, false positive rate {result['aa_false_positive_rate']:.3f}, "
        f"sample-ratio alarms {result['srm_alarms_in_aa']}\n"
        f"A/B: {result['ab_tests']} tests at planted lift {planted_lift:+.0%}: power {result['power']:.3f}, "
        f"mean measured lift {result['ab_mean_measured_lift']:+.3f}, interval coverage {result['ab_interval_coverage']:.3f}",
        highlight=False,
    )
