"""``recsys bench abtest`` on a small budget: the keys the issue names, a planted lift found, A/A
tests mostly quiet, reproducible with its seed, and its scratch schema gone afterwards; through
the API, every answer in its assigned variant and every list it served logged."""

from __future__ import annotations

import json

import psycopg
from typer.testing import CliRunner

from recsys.bench.abtest import run_abtest, run_abtest_through_api
from recsys.cli import app
from recsys.core.settings import Settings

runner = CliRunner()
KEYS = {"aa_tests", "aa_false_positive_rate", "ab_tests", "power", "planted_lift", "srm_alarms_in_aa"}


def schemas(settings: Settings) -> set[str]:
    with psycopg.connect(settings.require_database_url) as conn:
        rows = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'recsys_bench_abtest_%'").fetchall()
    return {row[0] for row in rows}


def test_a_large_planted_lift_is_found_and_a_rerun_gives_the_same_numbers(settings: Settings):
    before = schemas(settings)
    options = {"aa_tests": 12, "ab_tests": 12, "users": 1_500, "planted_lift": 0.6, "base_click_through": 0.1,
               "lists_per_user": 3.0, "days": 2, "seed": 7}
    first = run_abtest(settings, **options)
    assert first["aa_tests"] == 12 and first["ab_tests"] == 12
    assert first["power"] == 1.0  # +60 % at 750 shoppers a side: z ~ 6
    low, high = first["power_interval"]
    assert 0.7 < low < 0.8 and high == 1.0  # Wilson's interval of 12 out of 12
    low, high = first["aa_false_positive_rate_interval"]
    assert low <= first["aa_false_positive_rate"] <= high
    assert first["aa_false_positive_rate"] <= 3 / 12 and first["srm_alarms_in_aa"] <= 1
    assert 0.4 < first["ab_mean_measured_lift"] < 0.8
    assert first["mean_enrolled_users"] == 1_500  # the shares sum to 1: everyone is in
    again = run_abtest(settings, **options)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}
    no_lift = run_abtest(settings, **{**options, "planted_lift": 0.0, "aa_tests": 1})
    assert no_lift["power"] <= 3 / 12
    assert schemas(settings) == before


def test_the_command_ends_with_one_json_object(recsys_env: Settings):
    done = runner.invoke(app, ["bench", "abtest", "--through", "tables", "--aa-tests", "3", "--ab-tests", "3",
                               "--users", "400", "--json"])
    assert done.exit_code == 0, done.output
    result = json.loads(done.output.strip().splitlines()[-1])
    assert KEYS <= set(result) and result["planted_lift"] == 0.35 and result["aa_tests"] == 3
    assert result["through"] == "tables"


def test_through_the_api_every_answer_is_in_its_variant_and_every_list_served_is_logged(settings: Settings, tmp_path):
    """Each test publishes for real and its shoppers go through ``recsys serve``: the answers name
    the variant the assignment gives, the API logs every list it served to the experiment's
    users, the events carry the answers' recommendation ids, and a large planted lift is found."""
    result = run_abtest_through_api(settings, aa_tests=2, ab_tests=2, users=300, planted_lift=1.0,
                                    base_click_through=0.2, lists_per_user=3.0, seed=5, logs=tmp_path)
    assert KEYS <= set(result) and result["through"] == "api"
    assert (result["aa_tests"], result["ab_tests"]) == (2, 2)
    assert result["http_errors"] == 0, result["first_http_errors"]
    assert result["variant_mismatches"] == 0
    assert result["lists_served"] > 4 * 250 and result["exposures_lost"] == 0
    assert result["exposures_logged"] == result["lists_served"]
    assert result["events_posted"] > 0.1 * result["lists_served"]  # a fifth followed at the base rate
    assert result["mean_enrolled_users"] > 0.9 * result["users_per_test"]  # the analysis saw the shoppers
    assert result["power"] == 1.0  # +100 % at ~150 shoppers a side, 3 lists each
