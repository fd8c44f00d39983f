"""Evaluate stage: the holdout model vs a popularity baseline on the time-based holdout.

Both rank the same users with the same exclusions (what the user already had before the cutoff,
inactive products), so the comparison is like for like. The quality gate reads this report.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsys.core.errors import InputError, QualityGateError
from recsys.core.layout import EVALUATION_REPORT, FACTORS_HOLDOUT
from recsys.core.params import PipelineParams
from recsys.ml.als import load_factors
from recsys.ml.diversity import recommend_diverse_top_n
from recsys.ml.metrics import RankingMetrics, ranking_metrics
from recsys.ml.ranking import als_model, popularity_model, recommend_top_n
from recsys.pipeline.matrix import holdout_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationResult:
    report_path: Path
    model: RankingMetrics
    popularity: RankingMetrics
    passed: bool
    reason: str


def evaluate(
    matrix_dir: Path,
    model_dir: Path,
    eval_dir: Path,
    params: PipelineParams,
    live_metrics: dict | None = None,
) -> EvaluationResult:
    """Score the holdout model and popularity; decide the gate. ``live_metrics`` are the live
    version's (``meta.metrics``), if any: the model must not fall too far below them."""
    split = holdout_split(matrix_dir)
    manifest, train, train_exclude, blocked = split.manifest, split.fit, split.exclude, split.blocked_items
    users = split.users
    n_active = train.shape[1] - len(blocked)
    if n_active == 0:
        raise InputError(
            f"none of the {train.shape[1]} products with interactions is active in the catalogue; "
            "nothing can be recommended"
        )
    relevant = split.validation[users]

    user_factors, item_factors = load_factors(model_dir / FACTORS_HOLDOUT)
    # the gate judges the lists publish makes: re-ranked for diversity as they will be
    model_recs = recommend_diverse_top_n(
        als_model(user_factors, item_factors), users, train_exclude, params.k, params.diversity_lambda, blocked
    )
    item_popularity = np.asarray((train > 0).sum(axis=0)).ravel()
    popular_recs, _ = recommend_top_n(
        popularity_model(item_popularity, train.shape[0]), users, train_exclude, params.k, blocked
    )
    model_metrics = ranking_metrics(model_recs, relevant, params.k, n_catalog_items=n_active)
    popularity_metrics = ranking_metrics(popular_recs, relevant, params.k, n_catalog_items=n_active)

    threshold = popularity_metrics.map * (1 + params.min_lift)
    beats_popularity = model_metrics.map > threshold
    comparison = (
        f"model MAP@{params.k} {model_metrics.map:.4f} vs popularity MAP@{params.k} "
        f"{popularity_metrics.map:.4f} (needs > {threshold:.4f}, min_lift={params.min_lift:g})"
    )
    live_model = (live_metrics or {}).get("model") or {}
    holds_level = True
    if live_model.get("k") == params.k:
        floor = live_model["map"] * (1 - params.max_map_drop)
        holds_level = model_metrics.map >= floor
        comparison += (
            f", vs live model MAP@{params.k} {live_model['map']:.4f} "
            f"(needs >= {floor:.4f}, max_map_drop={params.max_map_drop:g})"
        )
    passed = beats_popularity and holds_level
    comparison += f" on {len(users)} holdout users after {manifest['holdout_cutoff']}"
    reason = ("passed: " if passed else "refused: ") + comparison

    eval_dir.mkdir(parents=True, exist_ok=True)
    report_path = eval_dir / EVALUATION_REPORT
    report = {
        "window": manifest["window"],
        "holdout_cutoff": manifest["holdout_cutoff"],
        "k": params.k,
        "model": model_metrics.to_dict(),
        "popularity": popularity_metrics.to_dict(),
        "gate": {
            "passed": passed,
            "reason": reason,
            "min_lift": params.min_lift,
            "max_map_drop": params.max_map_drop,
            "live_model_map": live_model.get("map"),
        },
    }
    report_path.write_text(json.dumps(report, indent=2))
    log.info("quality gate %s", reason)
    return EvaluationResult(report_path, model_metrics, popularity_metrics, passed, reason)


def enforce_quality_gate(result: EvaluationResult) -> None:
    """Raise when the model must not be published; the message says why."""
    if not result.passed:
        raise QualityGateError(f"quality gate {result.reason}; nothing was published")
