"""Train, evaluate and the quality gate on a generated shop in a real PostgreSQL."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import stage

from recsys.core.errors import QualityGateError
from recsys.core.layout import FACTORS_FULL, FACTORS_HOLDOUT
from recsys.core.params import PipelineParams
from recsys.ml.als import load_factors
from recsys.ml.families import describe, load_model
from recsys.pipeline.evaluate import enforce_quality_gate, evaluate
from recsys.pipeline.stages import run_pipeline
from recsys.pipeline.train import train
from recsys.storage import connect
from recsys.storage.reads import live_meta

SEVERAL_FAMILIES = ("als", "ease", "blend")  # what docs/quality.md suggests for a catalogue under 20k


@pytest.fixture
def trained(settings, demo_loaded, window_end):
    params = PipelineParams(models=SEVERAL_FAMILIES)
    return params, stage(settings, window_end, params)


def test_model_artifacts_are_npz_and_json_without_pickle(trained):
    params, paths = trained
    manifest = json.loads((paths.model / "manifest.json").read_text())
    assert manifest["params"] == params.to_dict()
    assert set(manifest["library_versions"]) >= {"implicit", "numpy", "scipy", "python"}
    assert manifest["window"]["end"].startswith("2026-11-28T03:00:00")
    # every family of params.models was tried, and the chosen one was saved
    assert set(manifest["selection"]["families"]) == set(params.models)
    assert manifest["model"]["family"] == manifest["selection"]["chosen"]["family"]
    for name in (FACTORS_FULL, FACTORS_HOLDOUT):
        model = load_model(paths.model / name)  # allow_pickle=False inside
        assert model.family == manifest["model"]["family"]
        assert np.isfinite(model.items.factors).all()


def test_training_twice_gives_the_same_model(trained, tmp_path):
    params, paths = trained
    train(paths.matrix, tmp_path / "again", params)
    first, second = load_model(paths.model / FACTORS_FULL), load_model(tmp_path / "again" / FACTORS_FULL)
    assert describe(first) == describe(second)
    np.testing.assert_allclose(first.items.factors, second.items.factors, rtol=1e-3, atol=1e-4)


def test_a_run_with_als_alone_trains_als_as_before(settings, demo_loaded, window_end):
    params = PipelineParams(models=("als",))
    paths = stage(settings, window_end, params)
    manifest = json.loads((paths.model / "manifest.json").read_text())
    assert manifest["selection"] is None and manifest["model"]["family"] == "als"
    user_factors, item_factors = load_factors(paths.model / FACTORS_FULL)  # the arrays of before
    assert user_factors.shape[1] == item_factors.shape[1] == params.factors


def test_model_beats_popularity_on_the_demo_shop(trained):
    params, paths = trained
    result = evaluate(paths.matrix, paths.model, paths.evaluation, params)
    assert result.passed, result.reason
    assert result.model.map > result.popularity.map
    assert result.model.users == result.popularity.users > 50
    assert result.model.coverage > result.popularity.coverage
    report = json.loads(result.report_path.read_text())
    assert report["gate"]["passed"] is True
    assert report["model"]["map"] == pytest.approx(result.model.map)
    enforce_quality_gate(result)  # does not raise


def test_gate_refuses_a_model_that_does_not_beat_popularity_enough(trained):
    _, paths = trained
    strict = PipelineParams(models=SEVERAL_FAMILIES, min_lift=50.0)
    result = evaluate(paths.matrix, paths.model, paths.evaluation, strict)
    assert not result.passed
    with pytest.raises(QualityGateError, match=r"refused: model MAP@10 0\.\d+ vs popularity MAP@10 0\.\d+"):
        enforce_quality_gate(result)
    assert json.loads(result.report_path.read_text())["gate"]["passed"] is False


def test_refused_pipeline_publishes_nothing(settings, demo_loaded, window_end):
    with pytest.raises(QualityGateError):
        run_pipeline(settings, window_end, PipelineParams(min_lift=50.0))
    assert live_meta(*connect(settings)) is None
