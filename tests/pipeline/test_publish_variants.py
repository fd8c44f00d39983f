"""Publish per variant (issue 23): the experiment running when train ran is served by the run's
publish, each enrolled user's list scored with their variant's params (and model), naming it;
everyone else's entry exactly as without an experiment."""

from __future__ import annotations

import json
from dataclasses import fields
from datetime import datetime

import numpy as np
import pyarrow as pa
import pytest
from helpers import REPO, live
from scipy.stats import chisquare

from recsys.core.errors import InputError
from recsys.core.experiments import (
    Experiment,
    GuardrailStop,
    Variant,
    list_experiments,
    record_guardrail_stop,
    start_experiment,
    stop_experiment,
)
from recsys.core.layout import EVALUATION_REPORT, EXPERIMENT, MANIFEST
from recsys.core.params import DATA_PARAMS, RUN_WIDE_PARAMS, SERVE_TIME_PARAMS, TRAINING_PARAMS, PipelineParams
from recsys.pipeline.publish.stage import (
    finish_publish,
    json_id_tokens,
    json_list_objects,
    new_attempt,
    prepare_publish,
    publish,
    publish_shard,
)
from recsys.pipeline.stages import extract_stage, matrix_stage, plan_run, train_stage

BASE = PipelineParams()  # diversity_lambda 0.3, top_n 10, factors 64
VARIANT_PARAMS = {"flat": {"diversity_lambda": 0.0}, "long": {"top_n": 15}, "small": {"factors": 8, "regularization": 1.0},
                  "doomed": {"diversity_lambda": 0.1}}
SHARE = 0.16  # five variants: 80 % of the users enrolled


def trained(settings, window_end, params: PipelineParams):
    """extract, matrix and train stages of a run (train snapshots the running experiment, if any)."""
    run = plan_run(settings, window_end, params, use_tuned=False)
    extract_stage(settings, run)
    matrix_stage(settings, run)
    train_stage(settings, run)
    run.paths.evaluation.mkdir(parents=True, exist_ok=True)
    (run.paths.evaluation / EVALUATION_REPORT).write_text(json.dumps({"model": {}, "popularity": {}}))
    return run.paths


def published(settings, paths, params: PipelineParams, shards: int = 1) -> dict[str, str]:
    """Publish the run's folder with ``params``; every live user entry as its raw JSON text."""
    publish(settings, paths.matrix, paths.model, paths.evaluation / EVALUATION_REPORT, params, shards=shards)
    build = live(settings)
    return {
        owner: raw
        for bucket in range(build.keys.buckets)
        for owner, raw in build.client.hscan_iter(build.keys.data(build.name, bucket, "user_recs"), count=1000)
    }


def test_every_param_has_one_kind():
    groups = (SERVE_TIME_PARAMS, TRAINING_PARAMS, DATA_PARAMS, RUN_WIDE_PARAMS)
    assert sum(map(len, groups)) == len(set().union(*groups))
    assert set().union(*groups) == {f.name for f in fields(PipelineParams)}


def test_entry_tails_stay_column_wise_json():
    tokens = json_id_tokens(pa.array(["7", "8", "9"]), "int")
    lists = np.array([[0, 1, -1], [2, -1, -1], [1, 0, 2]], dtype=np.int32)
    owners = json_id_tokens(pa.array(["101", "102", "103"]), "int")
    tails = pa.array(["", ',"experiment":"mix","variant":"long"', ""])
    plain = json_list_objects("user_id", owners, "recommended_products", tokens, lists)
    tailed = json_list_objects("user_id", owners, "recommended_products", tokens, lists, tails)
    assert tailed[0] == plain[0] and tailed[2] == plain[2]  # no fields: the same bytes
    assert tailed[1].as_py() == json.dumps(
        {"user_id": 102, "recommended_products": [9], "experiment": "mix", "variant": "long"}, separators=(",", ":")
    )


def test_data_and_run_wide_params_and_control_overrides_are_refused_at_start(settings):
    cases = [
        ((Variant("control", 0.5), Variant("b", 0.5, {"lookback_days": 30, "event_weights": {"view": 1}, "top_n": 5})),
         "variant 'b' overrides event_weights, lookback_days: data params (the window and matrix all variants share) "
         "cannot differ between variants"),
        ((Variant("control", 0.5), Variant("b", 0.5, {"similar_n": 5})),
         "variant 'b' overrides similar_n: run-wide params"),
        ((Variant("control", 0.5, {"top_n": 20}), Variant("b", 0.5)),
         "variant 'control' is the control (the first variant): it serves the run's params"),
    ]
    for variants, message in cases:
        with pytest.raises(InputError) as raised:
            start_experiment(settings, Experiment(name="refused", variants=variants))
        text = str(raised.value)
        assert "\n" not in text and text.startswith("invalid experiment 'refused': ") and message in text
        assert "serve-time params: ann_min_items, ann_scoring, diversity_lambda, new_arrival_slots, top_n" in text
    assert list_experiments(settings) == []


def test_the_next_publish_serves_every_variant(settings, demo_loaded, window_end):
    """Five variants: a serve-time one (diversity), one with longer lists, one with fewer factors
    (its own model), and one a guardrail stops between train and publish (its users get the
    control's lists, not enrolled). Each enrolled user's list is the one a publish with their
    variant's params alone gives; everyone else's entry is byte for byte the one without experiment."""
    start_experiment(settings, Experiment(
        name="mix", variants=(Variant("control", SHARE), *(Variant(n, SHARE, p) for n, p in VARIANT_PARAMS.items())),
    ))
    paths = trained(settings, window_end, BASE)
    manifest = json.loads((paths.model / MANIFEST).read_text())
    assert set(manifest["variants"]) == {"small"}  # the only variant whose training params differ
    assert json.loads((paths.model / EXPERIMENT).read_text())["name"] == "mix"
    record_guardrail_stop(settings, GuardrailStop("mix", "doomed", "click_through", -0.3, -0.5, -0.1, 0.0, "worse"))
    served = published(settings, paths, BASE, shards=3)
    meta = live(settings).meta()

    # the experiment-free lists of each variant's params alone (the experiment no longer runs)
    stop_experiment(settings, "mix", "done")
    alone = {"control": published(settings, trained(settings, window_end, BASE), BASE)}
    assert not (paths.model / EXPERIMENT).exists() and live(settings).meta()["experiment"] is None
    for name in ("flat", "long"):  # serve-time params: the same model
        alone[name] = published(settings, paths, Variant(name, SHARE, VARIANT_PARAMS[name]).pipeline_params(BASE))
    small = BASE.to_dict() | VARIANT_PARAMS["small"]
    alone["small"] = published(settings, trained(settings, window_end, PipelineParams.from_dict(small)),
                               PipelineParams.from_dict(small))

    snapshot = meta["experiment"]
    experiment, at = Experiment.from_snapshot(snapshot), datetime.fromisoformat(snapshot["assigned_at"])
    assert [v["stopped_at"] is not None for v in snapshot["variants"]] == [False, False, False, False, True]
    assert set(meta["variant_models"]) == {"small"}
    assert served.keys() == alone["control"].keys() and len(served) > 500
    hashed: dict[str, int] = {}
    enrolled: dict[str, int] = {}
    lengths: dict[str, list[int]] = {}
    for user, raw in served.items():
        entry = json.loads(raw)
        assignment = experiment.assign(user, at)
        variant = experiment.hashed_variant(user)
        hashed[variant.name if variant else "outside"] = hashed.get(variant.name if variant else "outside", 0) + 1
        if not assignment.enrolled:
            assert raw == alone["control"][user]  # not enrolled (outside, or in the stopped variant)
            continue
        enrolled[assignment.variant] = enrolled.get(assignment.variant, 0) + 1
        assert list(entry) == ["user_id", "recommended_products", "experiment", "variant"]
        assert (entry["experiment"], entry["variant"]) == ("mix", assignment.variant)
        reference = json.loads(alone[assignment.variant][user])
        assert entry["recommended_products"] == reference["recommended_products"], (user, assignment.variant)
        lengths.setdefault(assignment.variant, []).append(len(entry["recommended_products"]))
    assert "doomed" not in enrolled and hashed["doomed"] > 50  # its users got the control's lists
    assert snapshot["enrolled_users"] == {**enrolled, "doomed": 0}
    assert max(lengths["long"]) == 15 and max(lengths["control"]) == max(lengths["flat"]) == 10
    # the variants' lists differ from the control's for most of their users (else this proves nothing)
    for name in ("flat", "long", "small"):
        differ = sum(json.loads(served[u])["recommended_products"] != json.loads(alone["control"][u])["recommended_products"]
                     for u in served if experiment.assign(u, at).variant == name)
        assert differ > enrolled[name] / 2, name
    # shares within the analysis's sample-ratio tolerance (p > 0.001), the users outside included
    observed = [hashed.get(v.name, 0) for v in experiment.variants] + [hashed.get("outside", 0)]
    assert chisquare(observed, np.array([SHARE] * 5 + [1 - 5 * SHARE]) * len(served)).pvalue > 0.001


def test_the_stop_state_is_read_once_per_attempt(settings, demo_loaded, window_end):
    """A stop between two shards of one attempt (or before a shard's retry) changes nothing in that
    attempt: every shard splits the users as the attempt first read the experiment. The next
    attempt gives the stopped variant's users the control's lists."""
    start_experiment(settings, Experiment(
        name="two", variants=(Variant("control", 0.5), Variant("flat", 0.5, {"diversity_lambda": 0.0})),
    ))
    paths = trained(settings, window_end, BASE)
    report = paths.evaluation / EVALUATION_REPORT
    attempt = new_attempt()
    prepare_publish(settings, paths.matrix, paths.model, BASE, attempt)
    publish_shard(settings, paths.matrix, paths.model, BASE, attempt, 0, 2)
    record_guardrail_stop(settings, GuardrailStop("two", "flat", "click_through", -0.3, -0.5, -0.1, 0.0, "worse"))
    results = [publish_shard(settings, paths.matrix, paths.model, BASE, attempt, shard, 2) for shard in (0, 1)]  # a retry
    finish_publish(settings, paths.matrix, paths.model, report, BASE, attempt, results, 2)
    build = live(settings)
    meta = build.meta()
    assert meta["experiment"]["variants"][1]["stopped_at"] is None
    variants = {user: entry.get("variant") for user, entry in build.entries("user_recs")}
    assert set(variants.values()) == {"control", "flat"}
    users = sorted(variants, key=int)
    halves = (users[: len(users) // 2], users[len(users) // 2:])
    assert all(any(variants[u] == "flat" for u in half) for half in halves)  # both shards served it
    assert meta["experiment"]["enrolled_users"]["flat"] == sum(v == "flat" for v in variants.values())

    publish(settings, paths.matrix, paths.model, report, BASE)
    meta = live(settings).meta()
    assert meta["experiment"]["variants"][1]["stopped_at"] is not None
    after = dict(live(settings).entries("user_recs"))
    assert {entry.get("variant") for entry in after.values()} == {"control", None}
    assert meta["experiment"]["enrolled_users"] == {"control": sum(v == "control" for v in variants.values()), "flat": 0}


def test_the_daily_dag_serves_the_running_experiment(airflow_db, recsys_env, demo_loaded, window_end):
    """The DAG's own tasks (train, then the publish's prepare, mapped shards and switch)."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.state import DagRunState

    dag = DagBag(dag_folder=str(REPO / "dags")).dags["recsys_daily"]
    for task in dag.tasks:
        task.retries = 0
    start_experiment(recsys_env, Experiment(
        name="daily", variants=(Variant("control", 0.4), Variant("fewer", 0.4, {"factors": 8, "top_n": 12})),
    ))
    dag_run = dag.test(logical_date=window_end)
    assert dag_run.state == DagRunState.SUCCESS
    build = live(recsys_env)
    snapshot = build.meta()["experiment"]
    experiment, at = Experiment.from_snapshot(snapshot), datetime.fromisoformat(snapshot["assigned_at"])
    found: dict[str | None, int] = {}
    for user, entry in build.entries("user_recs"):
        assignment = experiment.assign(user, at)
        assert entry.get("variant") == (assignment.variant if assignment.enrolled else None)
        assert len(entry["recommended_products"]) <= (12 if entry.get("variant") == "fewer" else 10)
        found[entry.get("variant")] = found.get(entry.get("variant"), 0) + 1
    assert min(found.get(name, 0) for name in ("control", "fewer", None)) > 50
    assert snapshot["enrolled_users"] == {"control": found["control"], "fewer": found["fewer"]}
    assert set(build.meta()["variant_models"]) == {"fewer"}
