"""``recsys bench quality``: the MovieLens-100k benchmark, tuned on validation, tested once."""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from recsys.bench import frequency_scaled
from recsys.bench import movielens as quality
from recsys.bench.cart import evaluate_cart
from recsys.core.params import PipelineParams
from recsys.ml import evaluation
from recsys.ml import search as tuning
from recsys.ml.diversity import unit_rows
from recsys.ml.ranking import als_model, popularity_model

# the benchmark's search may also pick the frequency-scaled penalty (production's never does)
BENCH_SPACE = tuning.SearchSpace(regularization_exponent=(0.0, 1.0))


METRIC_NAMES = ("map", "ndcg_at_10", "precision_at_10", "recall_at_10")
# MMR strengths of the diversity trade-off (0 = the plain top 10)
DIVERSITY_LAMBDAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7)

# Microsoft Recommenders README, MovieLens-100k, k = 10 (same split protocol; numbers only).
PUBLISHED: dict[str, tuple[float, float, float, float]] = {
    "BiVAE": (0.1461, 0.4751, 0.4118, 0.2191),
    "BPR": (0.1325, 0.4420, 0.3882, 0.2125),
    "SAR": (0.1106, 0.3825, 0.3308, 0.1764),
    "NCF": (0.1077, 0.3961, 0.3473, 0.1808),
    "LightGCN": (0.0885, 0.4198, 0.3796, 0.1443),
    "SVD": (0.0129, 0.0959, 0.0912, 0.0328),
    "ALS (Spark, explicit)": (0.0047, 0.0442, 0.0485, 0.0178),
}


def run_quality(data: Path, seed: int, trials: int, dump: Path | None) -> dict:
    """Split, tune on a validation split of train, fit on train, evaluate once on test."""
    ratings = quality.load_ratings(data)
    train, test = quality.stratified_split(ratings, ratio=0.75, seed=seed)
    # validation is carved out of train the same per-user way; test is not looked at until the end
    fit_part, validation_part = quality.stratified_split(train, ratio=0.75, seed=seed)
    matrices = quality.build_matrices(train, test)
    fit_matrix = quality.interaction_matrix(fit_part, matrices.user_ids, matrices.item_ids)
    validation = quality.interaction_matrix(validation_part, matrices.user_ids, matrices.item_ids, binary=True)

    tuned = tuning.tune(fit_matrix, validation, n_trials=trials, seed=seed, space=BENCH_SPACE,
                        fitter=frequency_scaled.fit)

    began = time.perf_counter()
    user_factors, item_factors = frequency_scaled.fit(matrices.train, tuned.params, seed)
    fit_seconds = time.perf_counter() - began
    model = evaluation.evaluate_factors(
        user_factors, item_factors, matrices.train, matrices.test, blocked_items=matrices.unseen_items
    )
    popularity = evaluation.evaluate_popularity(matrices.train, matrices.test, blocked_items=matrices.unseen_items)
    if dump is not None:
        quality.dump(dump, train, test, matrices, model)
    genres = quality.load_genres(data, matrices.item_ids)
    genre_vectors = None if genres is None else unit_rows(genres)
    popularity_counts = np.diff(matrices.train.tocsc().indptr).astype(np.float32)
    # each model re-ranked on the cosine of its own item factors, as the publish stage does
    diversity = {
        name: evaluation.diversity_tradeoff(
            ranker, matrices.train, matrices.test, list(DIVERSITY_LAMBDAS), genre_vectors,
            blocked_items=matrices.unseen_items,
        )
        for name, ranker in (
            ("model", als_model(user_factors, item_factors)),
            ("popularity", popularity_model(popularity_counts, matrices.train.shape[0])),
        )
    }
    return {
        "model": evaluation.metric_summary(model.metrics),
        "popularity": evaluation.metric_summary(popularity.metrics),
        "params": tuned.params.to_dict(),
        "validation": evaluation.metric_summary(tuned.validation),
        "tuning_objective": tuned.objective,
        "trials": len(tuned.trials),
        "tuning_seconds": round(tuned.seconds, 2),
        "fit_seconds": round(fit_seconds, 2),
        "seed": seed,
        "test_users": model.metrics.users,
        "coverage": model.metrics.coverage,
        "diversity": diversity,
        "cart": evaluate_cart(ratings, seed),
    }


def results_table(result: dict) -> Table:
    table = Table(title=f"MovieLens-100k, k = 10, {result['test_users']} test users")
    table.add_column("algorithm")
    for name in ("MAP", "nDCG@10", "Precision@10", "Recall@10"):
        table.add_column(name, justify="right")
    table.add_row("ALS (ours, tuned on validation)", *(f"{result['model'][m]:.4f}" for m in METRIC_NAMES), style="bold")
    table.add_row("popularity (this run)", *(f"{result['popularity'][m]:.4f}" for m in METRIC_NAMES))
    for name, values in PUBLISHED.items():
        table.add_row(f"{name} (published)", *(f"{v:.4f}" for v in values), style="dim")
    return table


def diversity_table(result: dict) -> Table:
    table = Table(title="Diversity re-ranking (MMR on item-factor cosine), top 10 re-ranked from the top 40")
    for name in ("model", "λ", "MAP", "nDCG@10", "coverage", "intra-list diversity (genres)", "novelty (bits)"):
        table.add_column(name, justify="left" if name == "model" else "right")
    for model, rows in result["diversity"].items():
        for row in rows:
            diversity = row["intra_list_diversity"]
            table.add_row(
                "ALS" if model == "model" else model, f"{row['lambda']:g}", f"{row['map']:.4f}", f"{row['ndcg_at_10']:.4f}",
                f"{row['coverage']:.4f}", "-" if diversity is None else f"{diversity:.4f}", f"{row['novelty']:.3f}",
            )
    return table


def cart_table(result: dict) -> Table:
    cart = result["cart"]
    table = Table(title=f"Cart: hit rate@10 of a held-out basket item given the rest, {cart['test_baskets']} test "
                  f"baskets (temporal split; training before {cart['train_days_before']})")
    table.add_column("method")
    table.add_column("hit rate@10", justify="right")
    for method, hit_rate in cart["hit_rate_at_10"].items():
        table.add_row(method, "-" if hit_rate is None else f"{hit_rate:.4f}")
    return table


def plot_tradeoff(result: dict, path: Path) -> None:
    """Accuracy against coverage and against intra-list diversity, one point per λ (SVG or PNG by suffix)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = result["diversity"]["model"]
    lambdas = [row["lambda"] for row in rows]
    ndcg = [row["ndcg_at_10"] for row in rows]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for axis, key, label in ((axes[0], "coverage", "catalogue coverage of the top 10"),
                             (axes[1], "intra_list_diversity", "intra-list diversity (genres)")):
        values = [row[key] for row in rows]
        if any(value is None for value in values):
            continue
        axis.plot(values, ndcg, marker="o")
        for position, (value, score, diversity_lambda) in enumerate(zip(values, ndcg, lambdas, strict=True)):
            default = diversity_lambda == PipelineParams().diversity_lambda
            if default:
                axis.plot([value], [score], marker="o", markersize=12, fillstyle="none", color="black")
            # alternately above right and below left: the first points lie close together
            axis.annotate(f"λ={diversity_lambda:g}" + (" (default)" if default else ""), (value, score),
                          textcoords="offset points", xytext=(6, 6) if position % 2 == 0 else (-8, -14),
                          ha="left" if position % 2 == 0 else "right", fontsize=8)
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("nDCG@10 (test)")
    figure.suptitle("ALS on MovieLens-100k: accuracy against diversity, MMR λ from 0 to "
                    f"{max(lambdas):g}", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # no timestamp and fixed SVG ids: the same numbers give the same file
    with plt.rc_context({"svg.hashsalt": "recsys"}):
        figure.savefig(path, metadata={"Date": None} if path.suffix == ".svg" else None)
    plt.close(figure)


def quality_command(
    data: Annotated[Path, typer.Option(help="ml-100k folder (or its u.data file)", exists=True)],
    json_output: Annotated[bool, typer.Option("--json", help="end stdout with one JSON object")] = False,
    dump: Annotated[Path | None, typer.Option(help="write train.csv, test.csv, recommendations.csv here")] = None,
    trials: Annotated[int, typer.Option(min=1, help="tuning trials on the validation split")] = 100,
    seed: Annotated[int, typer.Option(help="split, search and model seed (the protocol uses 42)")] = 42,
    plot: Annotated[Path | None, typer.Option(help="draw the diversity trade-off here (.svg or .png)")] = None,
) -> None:
    """Tune ALS on a validation split of train, then evaluate once on the protocol's test split."""
    Console(stderr=True).print(f"tuning {trials} trials on a validation split of train ...")
    result = run_quality(data, seed=seed, trials=trials, dump=dump)
    console = Console()
    console.print(results_table(result))
    console.print(diversity_table(result))
    console.print(cart_table(result))
    if plot is not None:
        plot_tradeoff(result, plot)
    console.print(f"params: {result['params']}")
    console.print(f"tuning {result['tuning_seconds']} s ({result['trials']} trials), final fit {result['fit_seconds']} s")
    if json_output:
        sys.stdout.write(json.dumps(result) + "\n")


# Candidate defaults compared by `bench defaults`: the old ones, and settings of the kind tuning
# kept choosing (strong regularization, log-damped confidence).
DEFAULT_CANDIDATES: dict[str, tuning.AlsParams] = {
    "v0.1 (f64 reg0.05 a2 none)": tuning.AlsParams(64, 0.05, 2.0, 15, 0.0, "none"),
    "f64 reg5 a2 log": tuning.AlsParams(64, 5.0, 2.0, 15, 0.0, "log"),
    "f64 reg20 a4 log": tuning.AlsParams(64, 20.0, 4.0, 15, 0.0, "log"),
    "f64 reg40 a2 log": tuning.AlsParams(64, 40.0, 2.0, 15, 0.0, "log"),
    "f64 reg40 a4 none": tuning.AlsParams(64, 40.0, 4.0, 15, 0.0, "none"),
    "f64 reg40 a4 log": tuning.AlsParams(64, 40.0, 4.0, 15, 0.0, "log"),
    "f64 reg80 a4 log": tuning.AlsParams(64, 80.0, 4.0, 15, 0.0, "log"),
    "f128 reg40 a4 log": tuning.AlsParams(128, 40.0, 4.0, 15, 0.0, "log"),
}


def _validation_sets(data: Path | None, seed: int) -> dict[str, dict]:
    """Validation-only data sets: nothing here ever touches a test split."""
    import tempfile
    from datetime import UTC, datetime

    from recsys.core.params import PipelineParams
    from recsys.core.window import Window
    from recsys.local.demo import DEMO_ID_TYPES, DemoShop, write_demo_parquet
    from recsys.pipeline.matrix import build_matrix, holdout_split

    sets = {}
    if data is not None:
        train, _ = quality.stratified_split(quality.load_ratings(data), ratio=0.75, seed=seed)
        fit_part, validation_part = quality.stratified_split(train, ratio=0.75, seed=seed)
        matrices = quality.build_matrices(fit_part, validation_part)
        sets["ml-100k (validation of train)"] = {"fit": matrices.train, "validation": matrices.test}
    end = datetime(2026, 11, 28, 3, tzinfo=UTC)
    params = PipelineParams(confidence_scaling="none")
    for name, shop in {
        "demo shop 2k x 500": DemoShop(seed=seed),
        "demo shop 10k x 2k": DemoShop(users=10_000, products=2_000, seed=seed + 1),
    }.items():
        with tempfile.TemporaryDirectory() as directory:
            interactions, products = write_demo_parquet(shop, end, Path(directory) / "extract")
            window = Window(end - timedelta(days=params.lookback_days), end)
            build_matrix(interactions, products, window, Path(directory) / "matrix", params, DEMO_ID_TYPES)
            split = holdout_split(Path(directory) / "matrix")
        sets[f"{name} (time split)"] = {
            "fit": split.fit, "validation": split.validation,
            "exclude": split.exclude, "blocked_items": split.blocked_items,
        }
    return sets


def defaults_command(
    data: Annotated[Path | None, typer.Option(help="ml-100k folder; omit to use the demo shops only")] = None,
    seed: int = 42,
) -> None:
    """Compare candidate default ALS settings on validation splits (evidence for the defaults)."""
    sets = _validation_sets(data, seed)
    table = Table(title="MAP@10 / nDCG@10 on validation splits (no test data)")
    table.add_column("candidate")
    for name in sets:
        table.add_column(name, justify="right")
    for candidate, params in DEFAULT_CANDIDATES.items():
        cells = []
        for split in sets.values():
            metrics = tuning.validation_metrics(
                split["fit"], split["validation"], params, seed,
                exclude=split.get("exclude"), blocked_items=split.get("blocked_items"), fitter=frequency_scaled.fit,
            )
            cells.append(f"{metrics.map:.4f} / {metrics.ndcg:.4f}")
        table.add_row(candidate, *cells)
    Console().print(table)
