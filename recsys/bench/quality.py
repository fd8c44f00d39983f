"""``recsys bench quality``: the MovieLens-100k benchmark, tuned on validation, tested once."""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import scipy.sparse as sp
import typer
from rich.console import Console
from rich.table import Table

from recsys.bench import frequency_scaled
from recsys.bench import movielens as quality
from recsys.bench.cart import evaluate_cart
from recsys.core.params import PipelineParams
from recsys.ml import evaluation, selection
from recsys.ml import search as tuning
from recsys.ml.diversity import unit_rows
from recsys.ml.ranking import popularity_model
from recsys.ml.weighting import scale_confidence

# every family the benchmark chooses among (BPR: reported, never close on this data; docs/quality.md)
BENCH_FAMILIES = ("als", "bpr", "item_knn", "ease", "mult_dae", "blend")


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


# validation splits carved from train (seeds seed, seed + 1, ...): selection is their mean. Four, not
# two: the candidates near the top differ by ~0.001 nDCG@10, about one split's noise (docs/quality.md)
VALIDATION_SPLITS = 4
CONFIDENCE = "log"  # the pipeline's default confidence scaling: every family fits on what a shop's run gives it


def _weighted(matrix: sp.csr_matrix) -> sp.csr_matrix:
    return scale_confidence(matrix, CONFIDENCE)


def validation_splits(train: pd.DataFrame, matrices: quality.Matrices, seed: int) -> list[selection.ValidationSplit]:
    """Per-user random 75/25 splits of train (never of test), on the benchmark's id index."""
    splits = []
    for split_seed in range(seed, seed + VALIDATION_SPLITS):
        fit_part, validation_part = quality.stratified_split(train, ratio=0.75, seed=split_seed)
        fit_matrix = quality.interaction_matrix(fit_part, matrices.user_ids, matrices.item_ids)
        splits.append(selection.ValidationSplit(
            fit=_weighted(fit_matrix),
            relevant=quality.interaction_matrix(validation_part, matrices.user_ids, matrices.item_ids, binary=True),
            exclude=fit_matrix,
        ))
    return splits


def run_quality(data: Path, seed: int, dump: Path | None, families: tuple[str, ...] = BENCH_FAMILIES) -> dict:
    """Split; choose a model family and its settings on validation splits of train; fit every
    family's best on train and evaluate each once on test (the chosen one is ``model``)."""
    ratings = quality.load_ratings(data)
    train, test = quality.stratified_split(ratings, ratio=0.75, seed=seed)
    matrices = quality.build_matrices(train, test)
    began = time.perf_counter()
    chosen = selection.select(validation_splits(train, matrices, seed), families, seed=seed)
    selection_seconds = time.perf_counter() - began

    weighted_train = _weighted(matrices.train)
    test_split = selection.ValidationSplit(weighted_train, matrices.test, exclude=matrices.train,
                                           blocked_items=matrices.unseen_items)
    per_family, fitted = {}, {}
    for name, candidate in chosen.best.items():
        began = time.perf_counter()
        fitted[name] = selection.build(candidate.family, candidate.params).fit(weighted_train, seed)
        fit_seconds = time.perf_counter() - began
        per_family[name] = {
            "params": candidate.params,
            "validation": candidate.validation,
            "test": selection.validation_metrics(fitted[name], test_split, k=10),
            "fit_seconds": round(fit_seconds, 2),
        }
    model_name = "blend" if chosen.chosen.family == "blend" else chosen.chosen.family
    best_model = fitted[model_name]
    model = evaluation.evaluate_model(best_model, weighted_train, matrices.train, matrices.test,
                                      blocked_items=matrices.unseen_items)
    popularity = evaluation.evaluate_popularity(matrices.train, matrices.test, blocked_items=matrices.unseen_items)
    if dump is not None:
        quality.dump(dump, train, test, matrices, model)
    genres = quality.load_genres(data, matrices.item_ids)
    genre_vectors = None if genres is None else unit_rows(genres)
    popularity_counts = np.diff(matrices.train.tocsc().indptr).astype(np.float32)
    # each model re-ranked on the cosine of its own item vectors, as the publish stage does
    diversity = {
        name: evaluation.diversity_tradeoff(
            ranker, matrices.train, matrices.test, list(DIVERSITY_LAMBDAS), genre_vectors,
            blocked_items=matrices.unseen_items,
        )
        for name, ranker in (
            ("model", evaluation.FittedRanker(best_model, weighted_train)),
            ("popularity", popularity_model(popularity_counts, matrices.train.shape[0])),
        )
    }
    return {
        "model": evaluation.metric_summary(model.metrics),
        "popularity": evaluation.metric_summary(popularity.metrics),
        "chosen": model_name,
        "params": chosen.chosen.params,
        "validation": chosen.chosen.validation,
        "families": per_family,
        "selection": chosen.to_dict(),
        "selection_objective": chosen.objective,
        "selection_seconds": round(selection_seconds, 2),
        "fit_seconds": per_family[model_name]["fit_seconds"],
        "seed": seed,
        "test_users": model.metrics.users,
        "coverage": model.metrics.coverage,
        "diversity": diversity,
        "cart": evaluate_cart(ratings, seed),
    }


def run_seeds(data: Path, seeds: list[int], families: tuple[str, ...] = BENCH_FAMILIES) -> dict:
    """The chosen model's test metrics per seed (each seed its own split, selection and fit), and
    their mean and standard deviation."""
    runs = {}
    for seed in seeds:
        result = run_quality(data, seed, None, families)
        runs[str(seed)] = {"chosen": result["chosen"], "params": result["params"], "model": result["model"],
                           "families": {name: row["test"] for name, row in result["families"].items()}}
    summary = {}
    for metric in METRIC_NAMES:
        values = np.array([run["model"][metric] for run in runs.values()])
        summary[metric] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
    return {"seeds": runs, "mean": {m: summary[m]["mean"] for m in METRIC_NAMES},
            "sd": {m: summary[m]["sd"] for m in METRIC_NAMES}}


def results_table(result: dict) -> Table:
    table = Table(title=f"MovieLens-100k, k = 10, {result['test_users']} test users")
    table.add_column("algorithm")
    for name in ("MAP", "nDCG@10", "Precision@10", "Recall@10"):
        table.add_column(name, justify="right")
    table.add_row(f"{result['chosen']} (ours, chosen on validation)", *(f"{result['model'][m]:.4f}" for m in METRIC_NAMES),
                  style="bold")
    table.add_row("popularity (this run)", *(f"{result['popularity'][m]:.4f}" for m in METRIC_NAMES))
    for name, values in PUBLISHED.items():
        table.add_row(f"{name} (published)", *(f"{v:.4f}" for v in values), style="dim")
    return table


def families_table(result: dict) -> Table:
    table = Table(title=f"Every family's best settings on validation (mean of {VALIDATION_SPLITS} splits of train), "
                  "then on test; the chosen one by validation nDCG@10")
    for name in ("family", "params", "val nDCG@10", "MAP", "nDCG@10", "Precision@10", "Recall@10", "fit s"):
        table.add_column(name, justify="left" if name in ("family", "params") else "right")
    for name, row in result["families"].items():
        params = row["params"] if name != "blend" else {
            "weight": row["params"]["weight"], "of": "+".join(part["family"] for part in row["params"]["parts"])}
        table.add_row(name + (" *" if name == result["chosen"] else ""),
                      " ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                               for key, value in params.items()),
                      f"{row['validation']['ndcg']:.4f}", f"{row['test']['map']:.4f}", f"{row['test']['ndcg']:.4f}",
                      f"{row['test']['precision']:.4f}", f"{row['test']['recall']:.4f}", f"{row['fit_seconds']:.2f}")
    for name, why in result["selection"]["skipped"].items():
        table.add_row(name, why, *[""] * 6)
    return table


def seeds_table(repeated: dict) -> Table:
    table = Table(title=f"The chosen model over {len(repeated['seeds'])} seeds (each its own split and selection)")
    table.add_column("seed")
    table.add_column("chosen")
    for name in ("MAP", "nDCG@10", "Precision@10", "Recall@10"):
        table.add_column(name, justify="right")
    for seed, run in repeated["seeds"].items():
        table.add_row(seed, run["chosen"], *(f"{run['model'][m]:.4f}" for m in METRIC_NAMES))
    table.add_row("mean ± sd", "", *(f"{repeated['mean'][m]:.4f} ± {repeated['sd'][m]:.4f}" for m in METRIC_NAMES),
                  style="bold")
    return table


def diversity_table(result: dict) -> Table:
    table = Table(title="Diversity re-ranking (MMR on item-factor cosine), top 10 re-ranked from the top 40")
    for name in ("model", "λ", "MAP", "nDCG@10", "coverage", "intra-list diversity (genres)", "novelty (bits)"):
        table.add_column(name, justify="left" if name == "model" else "right")
    for model, rows in result["diversity"].items():
        for row in rows:
            diversity = row["intra_list_diversity"]
            table.add_row(
                result["chosen"] if model == "model" else model, f"{row['lambda']:g}", f"{row['map']:.4f}", f"{row['ndcg_at_10']:.4f}",
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
    figure.suptitle(f"{result['chosen']} on MovieLens-100k: accuracy against diversity, MMR λ from 0 to "
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
    seed: Annotated[int, typer.Option(help="split, selection and model seed (the protocol uses 42)")] = 42,
    seeds: Annotated[int, typer.Option(min=0, help="also run this many seeds (seed, seed+1, ...) for mean ± sd")] = 0,
    plot: Annotated[Path | None, typer.Option(help="draw the diversity trade-off here (.svg or .png)")] = None,
) -> None:
    """Choose a model family and its settings on validation splits of train, then evaluate each
    family's choice once on the protocol's test split."""
    Console(stderr=True).print(f"choosing among {', '.join(BENCH_FAMILIES)} on {VALIDATION_SPLITS} validation splits of train ...")
    result = run_quality(data, seed=seed, dump=dump)
    if seeds:
        result["repeated"] = run_seeds(data, list(range(seed, seed + seeds)))
    console = Console()
    console.print(results_table(result))
    console.print(families_table(result))
    if "repeated" in result:
        console.print(seeds_table(result["repeated"]))
    console.print(diversity_table(result))
    console.print(cart_table(result))
    if plot is not None:
        plot_tradeoff(result, plot)
    console.print(f"chosen: {result['chosen']} {result['params']}")
    console.print(f"selection {result['selection_seconds']} s ({result['selection']['tried']} settings), "
                  f"final fit {result['fit_seconds']} s")
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
