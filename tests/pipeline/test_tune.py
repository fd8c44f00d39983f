"""Production tuning: time-based validation on shop data, stored params, used by later runs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from helpers import REPO

from recsys.core.errors import QualityGateError
from recsys.core.params import PipelineParams
from recsys.pipeline.evaluate import enforce_quality_gate, evaluate
from recsys.pipeline.stages import (
    extract_stage,
    matrix_stage,
    plan_run,
    run_pipeline,
    train_stage,
)
from recsys.pipeline.tune import (
    TUNED_FIELDS,
    TunedParams,
    keep_result,
    load_tuned,
    result_path,
    tune_on_matrix,
    with_tuned,
)
from recsys.storage import connect
from recsys.storage.reads import live_meta

SEARCH = PipelineParams(confidence_scaling="none")


def tuned_example(**params) -> TunedParams:
    return TunedParams(
        params={"factors": 8, "regularization": 3.0, "alpha": 7.0, "iterations": 6, "confidence_scaling": "log", **params},
        validation={},
        window={"start": "2026-08-30T03:00:00+00:00", "end": "2026-11-28T03:00:00+00:00"},
        holdout_cutoff="2026-11-21T03:00:00+00:00",
        trials=1,
        seconds=0.1,
        tuned_at="2026-11-28T04:00:00+00:00",
    )


def test_tuned_values_fill_defaults_but_explicit_choices_win():
    tuned = tuned_example()
    assert with_tuned(PipelineParams(), None) == PipelineParams()
    merged = with_tuned(PipelineParams(factors=32, top_n=5), tuned)
    assert merged.factors == 32  # chosen by the run: kept
    assert (merged.regularization, merged.alpha, merged.iterations) == (3.0, 7.0, 6)
    assert merged.confidence_scaling == "log" and merged.top_n == 5


def test_tuning_on_a_time_split_stores_what_the_next_run_uses(settings, demo_loaded, window_end):
    run = plan_run(settings, window_end, SEARCH, use_tuned=False)
    extract_stage(settings, run)
    matrix_stage(settings, run)
    tuned = tune_on_matrix(run.paths.matrix, run.params, n_trials=4)

    assert set(tuned.params) == set(TUNED_FIELDS)
    assert tuned.trials == 4
    chosen, start = tuned.validation["chosen"], tuned.validation["starting_params"]
    assert chosen["map"] >= start["map"] > 0  # the starting params are trial 0: never worse
    assert tuned.window["end"] == window_end.isoformat()

    kept = keep_result(settings, tuned)
    assert kept.decision == "activated: no tuned params were active"
    assert load_tuned(settings) == kept
    assert json.loads(result_path(settings, kept).read_text()) == kept.to_dict()

    next_run = plan_run(settings, window_end, PipelineParams())
    for name in TUNED_FIELDS:
        assert getattr(next_run.params, name) == tuned.params[name]
    assert plan_run(settings, window_end, PipelineParams(), use_tuned=False).params == PipelineParams()


def test_tuning_refuses_scaled_weights(settings, demo_loaded, window_end, tmp_path):
    from recsys.core.errors import InputError

    with pytest.raises(InputError, match="confidence_scaling='none'"):
        tune_on_matrix(tmp_path, PipelineParams(confidence_scaling="log"), n_trials=1)


def test_gate_refuses_a_model_far_below_the_live_one(settings, demo_loaded, window_end):
    run = plan_run(settings, window_end, PipelineParams())
    extract_stage(settings, run)
    matrix_stage(settings, run)
    train_stage(settings, run)
    paths = run.paths
    fine = evaluate(paths.matrix, paths.model, paths.evaluation, run.params, {"model": {"k": 10, "map": 0.01}})
    assert fine.passed, fine.reason
    strong_live = {"model": {"k": 10, "map": fine.model.map * 2}}
    result = evaluate(paths.matrix, paths.model, paths.evaluation, run.params, strong_live)
    assert not result.passed
    with pytest.raises(QualityGateError, match=r"vs live model MAP@10 0\.\d+ \(needs >= 0\.\d+, max_map_drop=0\.2\)"):
        enforce_quality_gate(result)
    lenient = replace(run.params, max_map_drop=0.6)
    assert evaluate(paths.matrix, paths.model, paths.evaluation, lenient, strong_live).passed
    # a live model evaluated at another K is not comparable: only popularity decides
    assert evaluate(paths.matrix, paths.model, paths.evaluation, run.params, {"model": {"k": 5, "map": 0.99}}).passed


def test_tune_dag_then_daily_dag_uses_its_params(airflow_db, recsys_env, demo_loaded, window_end):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.state import DagRunState

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    tune_dag, daily_dag = bag.dags["recsys_tune"], bag.dags["recsys_daily"]
    # triggered only: a trigger that unpauses a scheduled DAG would also start its latest interval
    assert tune_dag.schedule is None and tune_dag.timetable.can_be_scheduled is False
    for task in [*tune_dag.tasks, *daily_dag.tasks]:
        task.retries = 0

    tuned_run = tune_dag.test(logical_date=window_end, run_conf={"n_trials": 3})
    assert tuned_run.state == DagRunState.SUCCESS
    tuned = load_tuned(recsys_env)
    assert tuned is not None and tuned.trials == 3

    daily_run = daily_dag.test(logical_date=window_end)
    assert daily_run.state == DagRunState.SUCCESS
    published = live_meta(*connect(recsys_env))["params"]
    for name in TUNED_FIELDS:
        assert published[name] == tuned.params[name]


def test_cli_pipeline_ignores_tuned_params_when_asked(settings, demo_loaded, window_end):
    keep_result(settings, tuned_example(factors=8))
    result = run_pipeline(settings, window_end, PipelineParams(), use_tuned=False)
    assert result.run.params.factors == PipelineParams().factors
    assert json.loads((result.run.paths.model / "manifest.json").read_text())["als"]["factors"] == 64


def scored(map_value: float, tuned_at: str = "2026-11-28T04:00:00+00:00", **fields) -> TunedParams:
    return replace(tuned_example(), validation={"chosen": {"map": map_value}, "starting_params": {"map": 0.1}},
                   tuned_at=tuned_at, **fields)


def test_promotion_never_regresses_unless_the_active_params_are_too_old():
    from datetime import UTC, datetime

    from recsys.pipeline.tune import promotion

    now = datetime(2026, 11, 29, tzinfo=UTC)
    active = scored(0.30, result_id="a")
    assert promotion(active, scored(0.31), 28, now)[0] is True  # same window, better
    worse, reason = promotion(active, scored(0.29), 28, now)
    assert worse is False and "not better than the active params' 0.3000 on the same validation window" in reason
    later_window = {"start": "2026-09-06T03:00:00+00:00", "end": "2026-12-05T03:00:00+00:00"}
    assert promotion(active, scored(0.9, window=later_window), 28, now)[0] is False  # not comparable
    # started from the active params: compared with them re-measured on the new window (0.1)
    assert promotion(active, scored(0.2, window=later_window, started_from="a"), 28, now)[0] is True
    old = scored(0.99, tuned_at="2026-10-01T00:00:00+00:00", result_id="old")
    stale, reason = promotion(old, scored(0.01), 28, now)
    assert stale is True and "59.0 days old, over 28" in reason


def test_concurrent_tunes_leave_the_better_result_active_and_keep_both(settings, demo_loaded, window_end):
    from concurrent.futures import ThreadPoolExecutor

    from recsys.core.layout import TUNED_RESULT_PREFIX
    from recsys.pipeline.stages import tune_stage
    from recsys.pipeline.tune import tuned_path

    # a poor start (heavy regularization, few factors): a larger budget finds better params
    poor_start = replace(SEARCH, factors=8, regularization=500.0, iterations=8)
    run = plan_run(settings, window_end, poor_start, use_tuned=False)
    extract_stage(settings, run)
    matrix_stage(settings, run)
    with ThreadPoolExecutor(2) as pool:
        small, large = pool.map(lambda trials: tune_stage(settings, run, trials), (1, 6))
    assert large.map > small.map, "the larger budget must find better params for this test to mean anything"
    assert load_tuned(settings).result_id == large.result_id
    kept = sorted(tuned_path(settings).parent.glob(f"{TUNED_RESULT_PREFIX}*.json"))
    assert {json.loads(path.read_text())["result_id"] for path in kept} == {small.result_id, large.result_id}
    assert [small.decision.startswith("activated"), large.decision.startswith("activated")].count(True) >= 1


def test_a_result_is_kept_out_if_any_family_regresses():
    from datetime import UTC, datetime

    from recsys.pipeline.tune import promotion

    def with_ease(als_map: float, ease_map: float, **fields) -> TunedParams:
        ease = {"params": {"regularization": 300.0, "binary": True},
                "validation": {"chosen": {"map": ease_map}, "starting_params": {"map": 0.05}}}
        return replace(scored(als_map, **fields), families={"ease": ease})

    now = datetime(2026, 11, 29, tzinfo=UTC)
    active = with_ease(0.30, 0.20, result_id="a")
    promoted, reason = promotion(active, with_ease(0.35, 0.19), 28, now)
    assert promoted is False and "ease MAP@K 0.1900 not better than the active params' 0.2000" in reason
    assert promotion(active, with_ease(0.30, 0.21), 28, now)[0] is True  # one better, none worse
    assert promotion(active, with_ease(0.30, 0.20), 28, now)[0] is False  # nothing better
    # a family the active params never tuned is compared with its defaults, measured as trial 0
    assert promotion(scored(0.30, result_id="a"), with_ease(0.30, 0.06), 28, now)[0] is True


FAMILIES_TUNED = ("als", "item_knn", "ease", "blend")


def test_two_tunes_of_one_window_give_the_same_params_and_numbers(settings, demo_loaded, window_end):
    run = plan_run(settings, window_end, SEARCH, use_tuned=False)
    extract_stage(settings, run)
    matrix_stage(settings, run)

    first, second = (tune_on_matrix(run.paths.matrix, run.params, n_trials=4, families=FAMILIES_TUNED, repeats=2)
                     for _ in range(2))

    assert set(first.families) == {"item_knn", "ease"}  # a blend's weight is chosen in every run
    for result in (first, second):
        assert result.repeats == 2 and result.trials == 4
        assert result.validation["chosen_sd"]["map"] >= 0.0
        for entry in result.families.values():
            assert entry["trials"] == 4 and entry["validation"]["chosen_sd"]["map"] == 0.0  # no seed: one fit
    assert first.params == second.params
    assert first.validation == second.validation  # every metric, mean and sd, to the last bit
    assert {name: (entry["params"], entry["validation"]) for name, entry in first.families.items()} == \
        {name: (entry["params"], entry["validation"]) for name, entry in second.families.items()}
    assert first.result_id != second.result_id


def test_a_family_other_than_als_gets_tuned_params_that_the_daily_run_fits(settings, demo_loaded, window_end):
    from datetime import UTC, datetime

    from recsys.pipeline.stages import tune_stage

    # the active params hold a poor item-kNN (one neighbour per product): its search starts there
    poor = {"similarity": "cosine", "neighbours": 1, "bm25_k1": 1.2, "bm25_b": 0.75, "binary": False}
    earlier = {"start": "2026-08-01T03:00:00+00:00", "end": "2026-10-30T03:00:00+00:00"}
    keep_result(settings, replace(tuned_example(), families={"item_knn": {"params": poor}}, result_id="poor",
                                  window=earlier, holdout_cutoff="2026-10-23T03:00:00+00:00",
                                  tuned_at=datetime.now(UTC).isoformat()))
    run = plan_run(settings, window_end, SEARCH, use_tuned=False)
    extract_stage(settings, run)
    matrix_stage(settings, run)

    tuned = tune_stage(settings, run, 6, ("als", "item_knn"), repeats=1)

    knn = tuned.families["item_knn"]
    assert knn["validation"]["starting_params"]["map"] < knn["validation"]["chosen"]["map"]
    assert knn["params"] != poor and knn["trials"] == 6
    assert tuned.decision.startswith("activated") and load_tuned(settings).family_params() == {"item_knn": knn["params"]}

    daily = PipelineParams(models=("als", "item_knn"))
    planned = plan_run(settings, window_end, daily)
    assert planned.params.family_params == {"item_knn": knn["params"]}
    # a run's own settings of a family win over the tuned ones
    own = {"item_knn": {"neighbours": 50}}
    assert plan_run(settings, window_end, replace(daily, family_params=own)).params.family_params == own
    extract_stage(settings, planned)
    matrix_stage(settings, planned)
    train_stage(settings, planned)
    manifest = json.loads((planned.paths.model / "manifest.json").read_text())
    assert manifest["selection"]["families"]["item_knn"]["params"] == knn["params"]
