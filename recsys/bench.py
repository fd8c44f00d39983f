"""``recsys bench quality``: the MovieLens-100k benchmark, tuned on validation, tested once."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from recsys import quality, tuning

bench_app = typer.Typer(help="Quality benchmarks.", no_args_is_help=True)

METRIC_NAMES = ("map", "ndcg_at_10", "precision_at_10", "recall_at_10")

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

    tuned = tuning.tune(fit_matrix, validation, n_trials=trials, seed=seed)

    began = time.perf_counter()
    user_factors, item_factors = tuning.fit(matrices.train, tuned.params, seed)
    fit_seconds = time.perf_counter() - began
    model = quality.evaluate_factors(
        user_factors, item_factors, matrices.train, matrices.test, blocked_items=matrices.unseen_items
    )
    popularity = quality.evaluate_popularity(matrices.train, matrices.test, blocked_items=matrices.unseen_items)
    if dump is not None:
        quality.dump(dump, train, test, matrices, model)
    return {
        "model": quality.metric_summary(model.metrics),
        "popularity": quality.metric_summary(popularity.metrics),
        "params": tuned.params.to_dict(),
        "validation": quality.metric_summary(tuned.validation),
        "tuning_objective": tuned.objective,
        "trials": len(tuned.trials),
        "tuning_seconds": round(tuned.seconds, 2),
        "fit_seconds": round(fit_seconds, 2),
        "seed": seed,
        "test_users": model.metrics.users,
        "coverage": model.metrics.coverage,
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


@bench_app.callback()
def _group() -> None:
    """Quality benchmarks."""


@bench_app.command("quality")
def quality_command(
    data: Annotated[Path, typer.Option(help="ml-100k folder (or its u.data file)", exists=True)],
    json_output: Annotated[bool, typer.Option("--json", help="end stdout with one JSON object")] = False,
    dump: Annotated[Path | None, typer.Option(help="write train.csv, test.csv, recommendations.csv here")] = None,
    trials: Annotated[int, typer.Option(min=1, help="tuning trials on the validation split")] = 100,
    seed: Annotated[int, typer.Option(help="split, search and model seed (the protocol uses 42)")] = 42,
) -> None:
    """Tune ALS on a validation split of train, then evaluate once on the protocol's test split."""
    Console(stderr=True).print(f"tuning {trials} trials on a validation split of train ...")
    result = run_quality(data, seed=seed, trials=trials, dump=dump)
    console = Console()
    console.print(results_table(result))
    console.print(f"params: {result['params']}")
    console.print(f"tuning {result['tuning_seconds']} s ({result['trials']} trials), final fit {result['fit_seconds']} s")
    if json_output:
        sys.stdout.write(json.dumps(result) + "\n")
