"""Evaluate stage: the holdout model (of the family train chose on a validation split of the
pre-holdout data) vs a popularity baseline on the time-based holdout.

Both rank the same users with the same exclusions (what the user already had before the cutoff,
inactive products), so the comparison is like for like. The quality gate reads this report.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from recsys.core.errors import InputError, QualityGateError
from recsys.core.layout import EVALUATION_REPORT, FACTORS_HOLDOUT, ITEMS, MANIFEST
from recsys.core.params import PipelineParams
from recsys.ml.families import describe, load_model
from recsys.ml.metrics import RankingMetrics, ranking_metrics
from recsys.ml.ranking import popularity_model, recommend_top_n
from recsys.ml.top_n import blocked_mask
from recsys.pipeline.matrix import holdout_split

log = logging.getLogger(__name__)

# the popularity-bias curve: share of recommendations among the top x % most popular products
TOP_SHARES_PERCENT = (1, 2, 5, 10, 20, 50, 100)
CATEGORIES_LISTED = 12  # the rest of the categories are summed as "other"


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

    # chosen on a validation split of the pre-holdout data (train): the holdout is new to it
    selection = json.loads((model_dir / MANIFEST).read_text()).get("selection")
    model = load_model(model_dir / FACTORS_HOLDOUT)
    # the gate judges the lists publish makes: re-ranked for diversity as they will be
    model_recs = model.recommend(
        users, train, params.k, exclude=train_exclude[users], blocked=blocked_mask(train.shape[1], blocked),
        diversity_lambda=params.diversity_lambda,
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
        "model_family": describe(model),
        # every family tried, with the validation metrics it was chosen on (None: ALS alone, no choice)
        "selection": selection,
        "model": model_metrics.to_dict(),
        "popularity": popularity_metrics.to_dict(),
        "gate": {
            "passed": passed,
            "reason": reason,
            "min_lift": params.min_lift,
            "max_map_drop": params.max_map_drop,
            "live_model_map": live_model.get("map"),
        },
        "distribution": {
            "model": recommendation_distribution(model_recs, item_popularity, matrix_dir),
            "popularity": recommendation_distribution(popular_recs, item_popularity, matrix_dir),
        },
    }
    report_path.write_text(json.dumps(report, indent=2))
    log.info("quality gate %s", reason)
    return EvaluationResult(report_path, model_metrics, popularity_metrics, passed, reason)


def recommendation_distribution(recs: np.ndarray, item_popularity: np.ndarray, matrix_dir: Path) -> dict:
    """How a top-K list set spreads over the catalogue: the popularity-bias curve (share of
    recommendations in the top x % most popular products), the share per category, and the mean
    number of distinct categories in one user's list."""
    valid = recs >= 0
    shown = recs[valid]
    n_items = len(item_popularity)
    rank = np.empty(n_items, dtype=np.int64)
    rank[np.argsort(-item_popularity, kind="stable")] = np.arange(n_items)
    curve = {
        str(percent): float((rank[shown] < max(1, round(n_items * percent / 100))).mean()) if shown.size else 0.0
        for percent in TOP_SHARES_PERCENT
    }
    categories = pq.read_table(matrix_dir / ITEMS, columns=["category"])["category"].to_pylist()
    codes = {name: code for code, name in enumerate(sorted({c or "(none)" for c in categories}))}
    item_category = np.array([codes[c or "(none)"] for c in categories], dtype=np.int64)
    counts = np.bincount(item_category[shown], minlength=len(codes))
    ordered = sorted(zip(codes, counts.tolist(), strict=True), key=lambda pair: -pair[1])
    shares = {name: count / max(1, shown.size) for name, count in ordered[:CATEGORIES_LISTED]}
    if len(ordered) > CATEGORIES_LISTED:
        shares["other"] = sum(count for _, count in ordered[CATEGORIES_LISTED:]) / max(1, shown.size)
    # distinct categories per list, vectorised: sort each row, count the changes (-1 is padding)
    user_categories = np.sort(np.where(valid, item_category[np.where(valid, recs, 0)], -1), axis=1)
    starts = np.diff(user_categories, axis=1, prepend=-1) != 0
    distinct = (starts & (user_categories >= 0)).sum(axis=1)
    return {
        "top_popular_share": curve,
        "category_share": shares,
        "mean_distinct_categories": float(distinct.mean()) if distinct.size else 0.0,
    }


def enforce_quality_gate(result: EvaluationResult) -> None:
    """Raise when the model must not be published; the message says why."""
    if not result.passed:
        raise QualityGateError(f"quality gate {result.reason}; nothing was published")
