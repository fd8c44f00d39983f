"""Experiments on real PostgreSQL: the tables behind ``recsys experiments start|list|stop``, the
analysis of exposures and outcome events (``report``) checked against a count of its own, the
guardrail's recorded stop, and the sample-ratio alarm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser

import numpy as np
import pytest
from helpers import REPO, simulated_experiment
from typer.testing import CliRunner

from recsys.cli import app
from recsys.core import db, experiments
from recsys.core.errors import InputError
from recsys.core.experiments import Experiment, Guardrail, Variant
from recsys.core.settings import Settings
from recsys.pipeline.experiments import report
from recsys.pipeline.report import experiment_page

runner = CliRunner()
START = datetime(2026, 11, 2, tzinfo=UTC)
END = START + timedelta(days=3)


def definition(name: str = "diversity", **fields) -> Experiment:
    values = {
        "variants": (Variant("control", 0.5), Variant("diverse", 0.5, {"diversity_lambda": 0.0})),
        "primary_metric": "click_through", "guardrails": (Guardrail("click_through"),),
        "starts_at": START, "ends_at": END, "salt": "test-salt", **fields,
    }
    return Experiment(name=name, **values)


def write(settings: Settings, exposures: list[tuple], events: list[tuple]) -> None:
    """Exposures (recommendation_id, experiment, variant, user, served_at, products) and events
    (user, product, type, value, occurred_at, recommendation_id), as the API will log them."""
    with db.connect(settings) as conn, conn.cursor() as cursor:
        with cursor.copy(db.sql_text(settings, "load_exposures")) as copy:
            for row in exposures:
                copy.write_row(row)
        with cursor.copy(db.sql_text(settings, "load_outcome_events")) as copy:
            for row in events:
                copy.write_row(row)


def test_start_list_stop_and_one_experiment_at_a_time(settings: Settings):
    now = START - timedelta(days=1)
    started = experiments.start_experiment(settings, definition(salt=""), now=now)
    assert len(started.salt) == 32 and started.created_at is not None
    read = experiments.get_experiment(settings, "diversity")
    assert read == started
    assert read.variants[1].params == {"diversity_lambda": 0.0} and read.status(now) == "scheduled"
    with pytest.raises(InputError, match="experiment 'diversity' runs at the same time .*recsys experiments stop diversity"):
        experiments.start_experiment(settings, definition("other", starts_at=END - timedelta(hours=1), ends_at=None), now=now)
    # right after it ends is fine; the name is never reused
    after = experiments.start_experiment(settings, definition("after", starts_at=END, ends_at=None), now=now)
    with pytest.raises(InputError, match="experiment name 'after' is taken"):
        experiments.start_experiment(settings, definition("after", starts_at=END + timedelta(days=30), ends_at=None), now=now)
    assert [e.name for e in experiments.list_experiments(settings)] == ["after", "diversity"]
    assert experiments.running_experiment(settings, START + timedelta(hours=1)).name == "diversity"  # type: ignore[union-attr]
    assert experiments.running_experiment(settings, END).name == "after"  # type: ignore[union-attr]
    stopped = experiments.stop_experiment(settings, "after", "enough", now=END + timedelta(days=1))
    assert experiments.get_experiment(settings, "after") == stopped and stopped.stop_reason == "enough"
    assert any(after.assign(f"u{i}", END + timedelta(days=2)).enrolled for i in range(200))
    assert not any(stopped.assign(f"u{i}", END + timedelta(days=2)).enrolled for i in range(200))
    with pytest.raises(InputError, match="experiment 'after' was stopped already"):
        experiments.stop_experiment(settings, "after", None)
    with pytest.raises(InputError, match="end 2026-11-05T00:00:00\\+00:00 is in the past: the experiment would never run"):
        experiments.start_experiment(settings, definition("past"), now=END)
    with pytest.raises(InputError, match="no experiment named 'nope'"):
        experiments.get_experiment(settings, "nope")


def test_a_schema_without_the_experiments_tables_gets_one_line(settings: Settings):
    with db.connect(settings) as conn:
        conn.execute("DROP TABLE experiment_decisions, experiment_variants, experiments")
    for action in (lambda: experiments.list_experiments(settings), lambda: experiments.start_experiment(settings, definition(), now=START)):
        with pytest.raises(InputError, match=r"no experiments tables: run `recsys init-db`"):
            action()


def test_the_report_counts_what_the_attribution_rules_count(settings: Settings):
    """Random traffic with every kind of event that must not count, against a count of the test's own."""
    experiment = experiments.start_experiment(settings, definition(), now=START)
    rng = np.random.default_rng(11)
    exposures, events = [], []
    truth: dict[tuple[str, str], dict[str, int]] = {}  # (variant, day) -> counts
    users_of: dict[str, set[str]] = {"control": set(), "diverse": set()}
    for number in range(400):
        user = f"user-{number}"
        variant = experiment.assign(user, START).variant
        users_of[variant].add(user)
        for k in range(int(rng.integers(1, 4))):
            rid = f"r{number}-{k}"
            served = START + timedelta(hours=float(rng.uniform(0, 71)))
            listed = [f"p{p}" for p in rng.choice(50, 5, replace=False)]
            exposures.append((rid, experiment.name, variant, user, served, listed))
            day = truth.setdefault((variant, served.date().isoformat()), {"lists": 0, "clicked": 0, "converted": 0, "users": set()})
            day["lists"] += 1
            day["users"].add(user)
            kind = rng.integers(0, 7)
            later = served + timedelta(minutes=5)
            if kind == 0:  # clicked and bought: both count
                events += [(user, listed[0], "view", None, later, rid), (user, listed[0], "purchase", 1, later, rid)]
                day["clicked"] += 1
                day["converted"] += 1
            elif kind == 1:  # two clicks on one list: one clicked list
                events += [(user, listed[1], "view", None, later, rid), (user, listed[2], "add_to_cart", 1, later, rid)]
                day["clicked"] += 1
            elif kind == 2:  # a product not in the list
                events.append((user, "p999", "view", None, later, rid))
            elif kind == 3:  # after the attribution window
                events.append((user, listed[0], "purchase", 1, served + timedelta(hours=25), rid))
            elif kind == 4:  # another user with this list's id, and a bought product without any id
                events += [("someone-else", listed[0], "view", None, later, rid), (user, listed[0], "purchase", 1, later, None)]
            elif kind == 5:  # negative feedback is not a click
                events.append((user, listed[0], "not_interested", None, later, rid))
    # outside the experiment's time and another experiment's rows are not read
    exposures.append(("late", experiment.name, "control", "user-0", END + timedelta(hours=1), ["p1"]))
    exposures.append(("other", "another", "control", "user-0", START + timedelta(hours=1), ["p1"]))
    exposures.append(("none", None, None, "user-0", START + timedelta(hours=1), ["p1"]))
    write(settings, exposures, events)

    result = report(settings, experiment.name, now=END + timedelta(days=1), act=False)
    assert result["status"] == "ended" and result["analysed_until"] == END.isoformat()
    assert result["users_in_several_variants"] == 0
    for variant in result["variants"]:
        name = variant["name"]
        rows = {day: counts for (v, day), counts in truth.items() if v == name}
        lists, clicked = sum(c["lists"] for c in rows.values()), sum(c["clicked"] for c in rows.values())
        converted = sum(c["converted"] for c in rows.values())
        assert (variant["exposed_users"], variant["lists"]) == (len(users_of[name]), lists)
        assert variant["click_through"]["value"] == pytest.approx(clicked / lists)
        assert variant["conversion"]["value"] == pytest.approx(converted / lists)
        assert variant["click_through"]["low"] < clicked / lists < variant["click_through"]["high"]
        assert [d["day"] for d in variant["days"]] == sorted(rows)
        for day in variant["days"]:
            expected = rows[day["day"]]
            assert (day["exposed_users"], day["lists"]) == (len(expected["users"]), expected["lists"])
            assert day["click_through"]["numerator"] == expected["clicked"]
            assert day["conversion"]["numerator"] == expected["converted"]
    control, diverse = result["variants"]
    assert control["lift"] is None
    lift = diverse["lift"]["click_through"]
    assert lift["value"] == pytest.approx(diverse["click_through"]["value"] / control["click_through"]["value"] - 1)
    assert result["srm"]["observed"] == {"control": len(users_of["control"]), "diverse": len(users_of["diverse"])}
    assert not result["srm"]["alarm"]
    assert result["decisions"] == [] and json.loads(json.dumps(result)) == result


def _traffic(experiment: Experiment, users: range, rates: dict[str, float], rng: np.random.Generator, variant_of=None):
    exposures, events = [], []
    for number in users:
        user = f"user-{number}"
        variant = variant_of(user) if variant_of else experiment.assign(user, experiment.starts_at).variant
        for k in range(3):
            rid = f"{experiment.name}-{number}-{k}"
            served = experiment.starts_at + timedelta(hours=number % 48, minutes=k)
            exposures.append((rid, experiment.name, variant, user, served, ["p1", "p2"]))
            if rng.random() < rates[variant]:
                events.append((user, "p1", "view", None, served + timedelta(minutes=1), rid))
    return exposures, events


def test_a_guardrail_stops_a_significantly_worse_variant_once_and_records_it(settings: Settings):
    experiment = experiments.start_experiment(settings, definition(), now=START)
    write(settings, *_traffic(experiment, range(800), {"control": 0.3, "diverse": 0.1}, np.random.default_rng(2)))
    looked = report(settings, experiment.name, now=START + timedelta(days=2), act=False)
    assert [check["decision"] for check in looked["guardrails"]] == ["stop"]
    assert experiments.get_experiment(settings, experiment.name).variants[1].stopped_at is None  # looking only

    decided_at = START + timedelta(days=2)
    acted = report(settings, experiment.name, now=decided_at, act=True)
    assert [check["decision"] for check in acted["guardrails"]] == ["stopped"]
    [decision] = acted["decisions"]
    assert decision["variant"] == "diverse" and decision["metric"] == "click_through"
    assert decision["lift_high"] < 0 and decision["lift"] == pytest.approx(acted["variants"][1]["lift"]["click_through"]["value"])
    assert "guardrail click_through: lift -6" in decision["reason"]
    stored = experiments.get_experiment(settings, experiment.name)
    assert stored.variants[1].stopped_at == decided_at and stored.variants[1].stop_reason == decision["reason"]
    assert acted["definition"]["variants"][1]["stopped_at"] == decided_at.isoformat()
    # from the stop on its users get the control, outside the experiment; the control's stay in
    later = decided_at + timedelta(minutes=1)
    users = [f"user-{n}" for n in range(800)]
    assert not any(stored.assign(u, later).enrolled for u in users if experiment.assign(u, START).variant == "diverse")
    assert all(stored.assign(u, later).enrolled for u in users if experiment.assign(u, START).variant == "control")
    # the sample ratio is counted among users first served before the stop; a second look records nothing new
    again = report(settings, experiment.name, now=decided_at + timedelta(hours=1), act=True)
    assert len(again["decisions"]) == 1 and again["srm"]["counted_before"] == decided_at.isoformat()


def test_too_few_users_or_a_drop_within_the_allowance_stop_nothing(settings: Settings):
    experiment = experiments.start_experiment(
        settings, definition(guardrails=(Guardrail("click_through", 0.9), Guardrail("conversion"))), now=START
    )
    write(settings, *_traffic(experiment, range(150), {"control": 0.3, "diverse": 0.1}, np.random.default_rng(4)))
    result = report(settings, experiment.name, now=END, act=True)
    decisions = {check["metric"]: check["decision"] for check in result["guardrails"]}
    # 150 users: fewer than MIN_USERS_FOR_DECISION on each side
    assert decisions == {"click_through": "too_few_users", "conversion": "too_few_users"}
    assert result["decisions"] == []


def test_exposures_logged_under_the_wrong_variant_raise_the_sample_ratio_alarm(settings: Settings):
    experiment = experiments.start_experiment(settings, definition(), now=START)

    def skewed(user: str) -> str:  # a third of the diverse users logged as control
        variant = experiment.assign(user, START).variant
        return "control" if variant == "diverse" and int(user.split("-")[1]) % 3 == 0 else variant

    rates = {"control": 0.2, "diverse": 0.2}
    write(settings, *_traffic(experiment, range(3_000), rates, np.random.default_rng(5), variant_of=skewed))
    result = report(settings, experiment.name, now=END, act=False)
    assert result["srm"]["alarm"] and result["srm"]["p_value"] < 1e-6


def test_the_experiments_commands(recsys_env: Settings, tmp_path):
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)  # the traffic below fits before now
    done = runner.invoke(app, [
        "experiments", "start", "diversity", "--variant", "control:0.5", "--variant", "diverse:0.5",
        "--set", "diverse.diversity_lambda=0.0", "--set", "diverse.top_n=20", "--metric", "conversion",
        "--guardrail", "click-through:0.05", "--start", start.isoformat(),
    ])
    assert done.exit_code == 0, done.output
    assert "experiment diversity starts" in done.output
    [listed] = [json.loads(line) for line in runner.invoke(app, ["experiments", "list", "--json"]).output.splitlines()]
    assert listed["variants"][1]["params"] == {"diversity_lambda": 0.0, "top_n": 20}
    assert listed["guardrails"] == [{"metric": "click_through", "max_drop": 0.05}] and listed["status"] == "running"
    assert listed["primary_metric"] == "conversion"
    experiment = experiments.get_experiment(recsys_env, "diversity")
    write(recsys_env, *_traffic(experiment, range(40), {"control": 0.5, "diverse": 0.5}, np.random.default_rng(1)))
    done = runner.invoke(app, ["experiments", "report", "diversity", "--json"])
    assert done.exit_code == 0, done.output
    result = json.loads(done.output.splitlines()[-1])
    assert [v["name"] for v in result["variants"]] == ["control", "diverse"]
    assert sum(v["lists"] for v in result["variants"]) == 120
    page = tmp_path / "diversity.html"
    table = runner.invoke(app, ["experiments", "report", "diversity", "--html", str(page)])
    assert table.exit_code == 0 and "sample ratio: p =" in table.output and "diverse" in table.output
    assert f"HTML report with plots: {page}" in table.output
    assert "<h2>Experiment diversity: running</h2>" in page.read_text() and page.read_text().count("<svg") == 3
    assert runner.invoke(app, ["experiments", "stop", "diversity", "--reason", "done"]).exit_code == 0
    assert "stopped" in runner.invoke(app, ["experiments", "list"]).output
    # as a user runs it: one line on stderr naming the field and the value
    done = subprocess.run(
        [sys.executable, "-m", "recsys", "experiments", "start", "x", "--variant", "control:0.5", "--variant",
         "b:0.5", "--set", "b.diversity_lambda=3"],
        env={**os.environ}, capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: invalid experiment 'x': variant 'b' params: invalid parameters: diversity_lambda must be in [0, 1], got 3"
    ]


class _Cells(HTMLParser):
    """The text of each table row's cells in the experiment section."""

    def __init__(self):
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_the_report_page_shows_the_analysis_numbers_and_plots(settings: Settings):
    """Simulated shoppers (those of `recsys bench abtest`) with a planted +30 % click-through: the
    page's table holds the analysis' own numbers; a plot of the rates per day and a forest plot."""
    simulated_experiment(settings, "shown", lift=0.3)
    result = report(settings, "shown", act=False)
    page = experiment_page(result)
    parser = _Cells()
    parser.feed(page)
    header, *rows = parser.rows[:3]
    assert header[:5] == ["variant", "share", "status", "exposed users", "lists"]
    for row, variant in zip(rows, result["variants"], strict=True):
        ctr, conversion = variant["click_through"], variant["conversion"]
        assert row[0] == variant["name"] and row[3] == f"{variant['exposed_users']:,}" and row[4] == f"{variant['lists']:,}"
        assert row[5] == f"{ctr['value']:.4f} [{ctr['low']:.4f}, {ctr['high']:.4f}]"
        assert row[7] == f"{conversion['value']:.4f} [{conversion['low']:.4f}, {conversion['high']:.4f}]"
    lift = result["variants"][1]["lift"]["click_through"]
    assert rows[1][6] == f"{lift['value']:+.1%} [{lift['low']:+.1%}, {lift['high']:+.1%}]" + (" (significant)" if lift["significant"] else "")
    assert rows[0][6] == "control" and result["variants"][1]["exposed_users"] > 900
    assert f"Sample ratio: p = {result['srm']['p_value']:.3g} (as configured)" in page
    assert page.count("<svg") == 3
    # the days plotted: 5 calendar days (4 x 24 h from now back) per variant, a band each
    assert len(result["variants"][0]["days"]) == 5
