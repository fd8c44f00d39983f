"""``recsys bench abtest``: proof by simulation that the experiment analysis keeps its promises.

Simulated shoppers each follow a list they were served with a probability of their own (a
Beta-distributed propensity: some shoppers click far more than others), times ``1 + planted
lift`` in the treatment of an A/B test; a followed list is a ``view`` event carrying its
``recommendation_id``, and becomes a purchase with a fixed probability. Every test is analysed by
``recsys experiments report``'s own code from the exposures and events tables. Reported: the A/A
tests' false positive rate, the A/B tests' power at the planted lift and how often their 95 %
intervals hold it, and the sample-ratio alarms.

Two ways to run the shoppers (``--through``):

- ``api`` (default): the whole product. A demo shop is generated and published by the pipeline
  once; each test starts an experiment, trains (which snapshots it) and publishes for real, then
  every shopper asks the API (``recsys serve``, a subprocess with 2 workers) for their list, and
  follows it through ``POST /users/{id}/events`` with the answer's ``recommendation_id``. The
  exposures are the ones the API logged; the answers' variants are checked against the
  assignment. Seconds per test.
- ``tables``: the same shoppers written straight into the tables with COPY (no API, no
  publish), fast enough for thousands of tests: the statistics alone.

Both work in an own schema and Redis prefix of the configured servers (else embedded ones),
removed at the end.
"""
from __future__ import annotations

import asyncio
import json
import math
import secrets
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
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


def _outcome(result: dict[str, Any]) -> dict[str, Any]:
    """What a test's analysis says of its treatment."""
    treatment = result["variants"][1]
    return {
        "lift": treatment["lift"]["click_through"], "conversion_lift": treatment["lift"]["conversion"],
        "srm_alarm": result["srm"]["alarm"],
        "guardrail_stop": any(check["decision"] == "stop" for check in result["guardrails"]),
        "users": sum(v["exposed_users"] for v in result["variants"]),
    }


def run_abtest(
    settings: Settings, aa_tests: int, ab_tests: int, users: int, planted_lift: float, base_click_through: float,
    lists_per_user: float, days: int, seed: int, progress: bool = False,
) -> dict[str, Any]:
    """``--through tables``: each test's exposures and events COPYed straight into the tables."""
    scratch = settings.model_copy(update={"db_schema": f"recsys_bench_abtest_{secrets.token_hex(4)}"})
    db.create_schema(scratch)
    rng = np.random.default_rng(seed)
    outcomes: dict[str, list[dict[str, Any]]] = {"aa": [], "ab": []}
    started = time.perf_counter()
    try:
        for done, (kind, index) in enumerate(_plan(aa_tests, ab_tests), 1):
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
            outcomes[kind].append(_outcome(result))
            if progress and done % 50 == 0:
                print(f"{done}/{aa_tests + ab_tests} tests analysed", file=sys.stderr)
    finally:
        db.drop_schema(scratch)
    return {
        **_summary(outcomes, planted_lift), "through": "tables",
        "users_per_test": users, "lists_per_user": lists_per_user, "base_click_through": base_click_through,
        "days": days, "seed": seed, "seconds": round(time.perf_counter() - started, 1),
    }


def _plan(aa_tests: int, ab_tests: int) -> list[tuple[str, int]]:
    return [("aa", i) for i in range(aa_tests)] + [("ab", aa_tests + i) for i in range(ab_tests)]


def _summary(outcomes: dict[str, list[dict[str, Any]]], planted_lift: float) -> dict[str, Any]:
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
        "mean_enrolled_users": float(np.mean([row["users"] for row in aa + ab])) if aa + ab else 0,
    }


# --- through the API -------------------------------------------------------------------------------

API_WORKERS = 2
API_CONNECTIONS = 16  # shoppers served at once, each on a keep-alive connection of the client
EXPOSURE_FLUSH_SECONDS = 0.2  # the API's background COPY of what it served, sped up for the bench
EXPOSURES_WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class Shoppers:
    """One test's shoppers, drawn before any request so the run does not depend on the order the
    answers come back in: per shopper a propensity and a number of lists; per list the draws that
    decide a follow, the product followed and a purchase."""

    user_ids: list[str]
    propensity: np.ndarray
    lists: np.ndarray
    follow_draw: list[np.ndarray]
    pick_draw: list[np.ndarray]
    purchase_draw: list[np.ndarray]

    @classmethod
    def draw(cls, user_ids: list[str], rng: np.random.Generator, base_click_through: float, lists_per_user: float) -> Shoppers:
        a = base_click_through * PROPENSITY_CONCENTRATION
        count = len(user_ids)
        lists = 1 + rng.poisson(lists_per_user - 1, count)
        return cls(
            user_ids, rng.beta(a, PROPENSITY_CONCENTRATION - a, count), lists,
            [rng.random(n) for n in lists], [rng.random(n) for n in lists], [rng.random(n) for n in lists],
        )


@dataclass
class Traffic:
    """What one test's shoppers did through the API."""

    lists: int = 0  # answers to enrolled users: each one an exposure the API must log
    events: int = 0
    variant_mismatches: int = 0  # answers whose variant is not the one the assignment gives
    errors: list[str] = field(default_factory=list)


async def _shop(
    port: int, write_key: str, experiment: Experiment, shoppers: Shoppers, lift: float, at: datetime
) -> Traffic:
    """Every shopper asks for their list ``lists[u]`` times and follows some (``Shoppers``)."""
    from recsys.bench.serve import exchange, http_request

    traffic = Traffic()
    idle: asyncio.Queue = asyncio.Queue()
    for _ in range(API_CONNECTIONS):
        idle.put_nowait(await asyncio.open_connection("127.0.0.1", port))

    async def call(connection, method: str, path: str, body: dict | None = None) -> dict | None:
        status, answer = await exchange(*connection, http_request(
            method, path, b"" if body is None else json.dumps(body).encode(), write_key))
        if status not in (200, 201):
            traffic.errors.append(f"{method} {path}: HTTP {status} {answer[:200]!r}")
            return None
        return json.loads(answer)

    async def shopper(u: int) -> None:
        user_id = shoppers.user_ids[u]
        expected = experiment.assign(user_id, at)
        connection = await idle.get()
        try:
            for i in range(int(shoppers.lists[u])):
                answer = await call(connection, "GET", f"/users/{user_id}/recommendations")
                if answer is None:
                    continue
                variant = answer["variant"]
                traffic.variant_mismatches += variant != (expected.variant if expected.enrolled else None)
                traffic.lists += variant is not None
                products = answer["recommended_products"]
                chance = shoppers.propensity[u] * (1 + lift if variant == "treatment" else 1.0)
                if not products or shoppers.follow_draw[u][i] >= min(chance, 1.0):
                    continue
                product = products[int(shoppers.pick_draw[u][i] * len(products))]
                followed = [{"product_id": product, "event_type": "view", "recommendation_id": answer["recommendation_id"]}]
                if shoppers.purchase_draw[u][i] < PURCHASE_GIVEN_CLICK:
                    followed.append({**followed[0], "event_type": "purchase", "value": 1})
                for event in followed:
                    # awaited before the count is read: other shoppers' counts land meanwhile
                    posted = await call(connection, "POST", f"/users/{user_id}/events", event)
                    traffic.events += posted is not None
        finally:
            idle.put_nowait(connection)

    try:
        await asyncio.gather(*(shopper(u) for u in range(len(shoppers.user_ids))))
    finally:
        while not idle.empty():
            idle.get_nowait()[1].close()
    return traffic


def _wait_for_exposures(settings: Settings, experiment: str, expected: int) -> int:
    """The exposures the API logged for ``experiment``, once its flushes brought them all (or the
    wait ran out: the shortfall is reported as lost)."""
    deadline = time.monotonic() + EXPOSURES_WAIT_SECONDS
    while True:
        with db.connect(settings) as conn:
            logged = conn.execute(db.sql_text(settings, "count_exposures"), {"experiment": experiment}).fetchone()[0]
        if logged >= expected or time.monotonic() > deadline:
            return logged
        time.sleep(EXPOSURE_FLUSH_SECONDS)


def run_abtest_through_api(
    settings: Settings, aa_tests: int, ab_tests: int, users: int, planted_lift: float, base_click_through: float,
    lists_per_user: float, seed: int, logs: Path, progress: bool = False,
) -> dict[str, Any]:
    """``--through api``: each test published for real and its shoppers served by the API (the
    module docstring). ``settings``: an own schema and Redis prefix (``services.isolated``)."""
    import uvloop

    from recsys.bench.serve import api_server, published_users
    from recsys.core.params import PipelineParams
    from recsys.local.demo import DemoShop, load_demo
    from recsys.pipeline.stages import publish_stage, run_pipeline, train_stage
    from recsys.storage.live import MAX_POINTER_AGE_SECONDS

    end = datetime.now(UTC).replace(microsecond=0)
    load_demo(settings, DemoShop(users=users, products=CATALOGUE, seed=seed), end=end)
    run = run_pipeline(settings, end, PipelineParams(), use_tuned=False).run
    user_ids = sorted(published_users(settings))
    write_key = secrets.token_urlsafe(32)
    rng = np.random.default_rng(seed)
    outcomes: dict[str, list[dict[str, Any]]] = {"aa": [], "ab": []}
    totals = {"lists": 0, "events": 0, "exposures_logged": 0, "variant_mismatches": 0, "errors": 0}
    first_errors: list[str] = []
    started = time.perf_counter()
    more_env = {
        "RECSYS_API_KEYS": f"write:{write_key}", "RECSYS_API_WRITE_RATE": str(10**9),
        "RECSYS_API_EXPOSURE_FLUSH_SECONDS": str(EXPOSURE_FLUSH_SECONDS),
    }
    with api_server(settings, logs / "api.log", API_WORKERS, more_env) as port:
        for done, (kind, index) in enumerate(_plan(aa_tests, ab_tests), 1):
            now = datetime.now(UTC)
            experiment = experiments.start_experiment(
                settings, replace(_experiment(index, kind, 1, seed), starts_at=now, ends_at=None), now=now
            )
            train_stage(settings, run)  # snapshots the experiment it finds running
            publish_stage(settings, run)
            # an API process reads the live pointer at most this long ago: after it, every answer
            # comes from the version just published
            time.sleep(MAX_POINTER_AGE_SECONDS)
            shoppers = Shoppers.draw(user_ids, rng, base_click_through, lists_per_user)
            traffic = uvloop.run(_shop(port, write_key, experiment, shoppers, 0.0 if kind == "aa" else planted_lift, now))
            logged = _wait_for_exposures(settings, experiment.name, traffic.lists)
            until = datetime.now(UTC)
            result = analyse(experiment, read_user_days(settings, experiment, until), until)
            experiments.stop_experiment(settings, experiment.name, "bench test analysed", now=until)
            outcomes[kind].append(_outcome(result))
            for name, value in (("lists", traffic.lists), ("events", traffic.events), ("exposures_logged", logged),
                                ("variant_mismatches", traffic.variant_mismatches), ("errors", len(traffic.errors))):
                totals[name] += value
            first_errors.extend(traffic.errors[: 3 - len(first_errors)])
            if progress and done % 10 == 0:
                print(f"{done}/{aa_tests + ab_tests} tests served and analysed "
                      f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return {
        **_summary(outcomes, planted_lift), "through": "api",
        "users_per_test": len(user_ids), "lists_per_user": lists_per_user, "base_click_through": base_click_through,
        "seed": seed, "api_workers": API_WORKERS,
        "requests": totals["lists"] + totals["events"], "lists_served": totals["lists"],
        "events_posted": totals["events"], "exposures_logged": totals["exposures_logged"],
        "exposures_lost": totals["lists"] - totals["exposures_logged"],
        "variant_mismatches": totals["variant_mismatches"], "http_errors": totals["errors"],
        "first_http_errors": first_errors, "seconds": round(time.perf_counter() - started, 1),
    }


def abtest_command(
    aa_tests: Annotated[
        int, typer.Option(min=1, help="A/A tests (both variants alike); 200 pin the false-positive rate to about ±0.03.")
    ] = 200,
    ab_tests: Annotated[int, typer.Option(min=1, help="A/B tests with the planted lift.")] = 100,
    users: Annotated[int, typer.Option(min=10, help="Shoppers per test (half in each variant).")] = 2000,
    planted_lift: Annotated[float, typer.Option(min=0.0, help="Relative click-through lift of the treatment.")] = 0.35,
    base_click_through: Annotated[float, typer.Option(min=0.001, max=0.5, help="The control's mean click-through.")] = 0.1,
    lists_per_user: Annotated[float, typer.Option(min=1.0, help="Mean lists a shopper sees per test.")] = 2.0,
    days: Annotated[int, typer.Option(min=1, max=60, help="Days per test (--through tables; through the API a test runs for real).")] = 7,
    through: Annotated[
        str, typer.Option(help="api: shoppers served by the API after a real publish; tables: rows COPYed straight in")
    ] = "api",
    seed: int = 42,
    json_output: Annotated[bool, typer.Option("--json", help="end stdout with one JSON object")] = False,
) -> None:
    """False-positive rate of A/A tests and power of A/B tests of the experiment analysis, on
    simulated shoppers (module docstring: ``--through api`` drives the real API)."""
    if through not in ("api", "tables"):
        raise typer.BadParameter(f"must be api or tables, got {through!r}", param_hint="--through")
    if through == "api":
        import tempfile

        from recsys.local import services

        with services.isolated("bench-abtest") as settings, tempfile.TemporaryDirectory(prefix="recsys-abtest-") as logs:
            result = run_abtest_through_api(settings, aa_tests, ab_tests, users, planted_lift, base_click_through,
                                            lists_per_user, seed, Path(logs), progress=True)
    else:
        result = run_abtest(
            Settings(), aa_tests, ab_tests, users, planted_lift, base_click_through, lists_per_user, days, seed,
            progress=True,
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
