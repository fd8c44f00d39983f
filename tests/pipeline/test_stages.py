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
from recsys.pipeline.evaluate import enforce_quality_gate, evaluate
from recsys.pipeline.stages import run_pipeline
from recsys.pipeline.train import train
from recsys.storage import connect
from recsys.storage.reads import live_meta


@pytest.fixture
def trained(settings, demo_loaded, window_end):
    params = PipelineParams()
    return params, stage(settings, window_end, params)


def test_model_artifacts_are_npz_and_json_without_pickle(trained):
    params, paths = trained
    manifest = json.loads((paths.model / "manifest.json").read_text())
    assert manifest["params"] == params.to_dict()
    assert set(manifest["library_versions"]) >= {"implicit", "numpy", "scipy", "python"}
    assert manifest["window"]["end"].startswith("2026-11-28T03:00:00")
    for name in (FACTORS_FULL, FACTORS_HOLDOUT):
        user_factors, item_factors = load_factors(paths.model / name)  # allow_pickle=False inside
        assert user_factors.shape[1] == item_factors.shape[1] == params.factors
        assert np.isfinite(user_factors).all() and np.isfinite(item_factors).all()


def test_training_twice_gives_the_same_model(trained, tmp_path):
    params, paths = trained
    train(paths.matrix, tmp_path / "again", params)
    first, second = load_factors(paths.model / FACTORS_FULL), load_factors(tmp_path / "again" / FACTORS_FULL)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


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
    strict = PipelineParams(min_lift=50.0)
    result = evaluate(paths.matrix, paths.model, paths.evaluation, strict)
    assert not result.passed
    with pytest.raises(QualityGateError, match=r"refused: model MAP@10 0\.\d+ vs popularity MAP@10 0\.\d+"):
        enforce_quality_gate(result)
    assert json.loads(result.report_path.read_text())["gate"]["passed"] is False


def test_refused_pipeline_publishes_nothing(settings, demo_loaded, window_end):
    with pytest.raises(QualityGateError):
        run_pipeline(settings, window_end, PipelineParams(min_lift=50.0))
    assert live_meta(*connect(settings)) is None
