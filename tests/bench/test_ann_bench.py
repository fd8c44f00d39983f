"""``recsys.bench.ann`` on synthetic factors: the figures the docs table is made of."""

from __future__ import annotations

from recsys.bench.ann import synthetic
from recsys.core.params import PipelineParams


def test_synthetic_comparison_reports_recall_map_and_speedup():
    figures = synthetic(items=3_000, users=300, dims=16, seed=1, params=PipelineParams())

    assert figures["synthetic"] is True and figures["library"] == "faiss"
    assert figures["items"] == 3_000 and figures["users"] == 300 and figures["k"] == 10
    # 88+ candidates of 3,000 items: the graph finds nearly every exact list
    assert 0.95 <= figures["recall_at_10"] <= 1
    assert figures["map_exact"] > 0 and abs(figures["map_delta"]) <= 0.05
    assert figures["speedup_min"] <= figures["speedup"] <= figures["speedup_max"] and figures["repeats"] == 3
