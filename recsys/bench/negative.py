"""``recsys bench negative``: how negative feedback should count in training, measured on MovieLens-100k.

Proxy: ratings <= 2 are ``dislike`` events, ratings >= 4 are ``rating`` events (value = the
rating, the relevant hits), 3 is a ``view``. The pipeline's own matrix stage builds the matrices
(window = the whole data set, temporal holdout of the last ``holdout_days``) and the model is
scored as the evaluate stage scores it (MAP@10 of the diverse lists, already rated items
excluded). Variants of the dislikes in training:

- ``as positive``: logged as ordinary ratings (what a shop gets without negative feedback);
- ``not at all``: ``negative_event_types`` as shipped (the pair has no weight);
- ``negative w``: the pair enters the training matrix as ``-log1p(w)``, which implicit's ALS reads
  as preference 0 with confidence ``alpha * log1p(w)`` (a research variant: production never does).
"""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
import typer
from rich.console import Console
from rich.table import Table

from recsys.bench import movielens
from recsys.core.ids import IdTypes
from recsys.core.params import PipelineParams
from recsys.core.window import Window
from recsys.ml.als import fit_als
from recsys.ml.diversity import recommend_diverse_top_n
from recsys.ml.metrics import ranking_metrics
from recsys.ml.ranking import als_model
from recsys.pipeline.extract import INTERACTIONS_SCHEMA
from recsys.pipeline.matrix import build_matrix, holdout_split, load_ids

NEGATIVE_WEIGHTS = (0.5, 1.0, 2.0, 4.0)
DISLIKE_AT_MOST, LIKE_AT_LEAST = 2, 4


def _event_types(ratings: pd.DataFrame, dislikes_as: str) -> np.ndarray:
    return np.where(
        ratings["rating"] >= LIKE_AT_LEAST, "rating", np.where(ratings["rating"] <= DISLIKE_AT_MOST, dislikes_as, "view")
    )


def _write_extract(ratings: pd.DataFrame, dislikes_as: str, directory: Path) -> tuple[Path, Path, Window]:
    """The ratings as an extract of the pipeline would hold them, and the window covering them all."""
    directory.mkdir(parents=True, exist_ok=True)
    occurred = pd.to_datetime(ratings["timestamp"], unit="s", utc=True)
    liked = ratings["rating"] >= LIKE_AT_LEAST
    table = pa.table(
        {
            "user_id": ratings["user_id"].astype(str), "product_id": ratings["item_id"].astype(str),
            "event_type": _event_types(ratings, dislikes_as),
            "value": np.where(liked | (dislikes_as == "rating"), ratings["rating"], np.nan).astype(np.float32),
            "occurred_at": occurred,
        },
        schema=INTERACTIONS_SCHEMA,
    )
    pq.write_table(table, directory / "interactions.parquet")
    items = sorted(ratings["item_id"].astype(str).unique())
    pq.write_table(
        pa.table({"product_id": items, "name": items, "category": pa.nulls(len(items), pa.string()),
                  "active": [True] * len(items)}),
        directory / "products.parquet",
    )
    end = occurred.max().to_pydatetime() + timedelta(seconds=1)
    start = datetime.fromtimestamp(int(ratings["timestamp"].min()) // 86400 * 86400, UTC)
    return directory / "interactions.parquet", directory / "products.parquet", Window(start, end)


def _with_negatives(fit: sp.csr_matrix, ratings: pd.DataFrame, matrix_dir: Path, cutoff: datetime, weight: float) -> sp.csr_matrix:
    """``fit`` with every dislike before ``cutoff`` entered as ``-log1p(weight)``."""
    users, items = load_ids(matrix_dir / "users.parquet"), load_ids(matrix_dir / "items.parquet")
    dislikes = ratings[(ratings["rating"] <= DISLIKE_AT_MOST) & (ratings["timestamp"] < cutoff.timestamp())]
    rows = pd.Index(users).get_indexer(dislikes["user_id"].astype(str))
    cols = pd.Index(items).get_indexer(dislikes["item_id"].astype(str))
    known = rows >= 0  # a user with only dislikes is not in the model
    negatives = sp.csr_matrix(
        (np.full(int(known.sum()), -np.log1p(weight), np.float32), (rows[known], cols[known])), shape=fit.shape
    )
    return (fit + negatives).tocsr()


def measure(data: Path, holdout_days: int, seeds: tuple[int, ...]) -> list[dict]:
    """MAP@10 / nDCG@10 per variant, averaged over ``seeds`` (and each seed's MAP)."""
    ratings = movielens.load_ratings(data)
    span_days = (ratings["timestamp"].max() - ratings["timestamp"].min()) // 86400 + 2
    params = PipelineParams(
        lookback_days=int(span_days), holdout_days=holdout_days, exclude_event_types=("rating", "view"),
        relevant_event_types=("rating",),
    )
    variants: list[tuple[str, str, float | None]] = [("as positive", "rating", None), ("not at all (chosen)", "dislike", None)]
    variants += [(f"negative, w = {w:g}", "dislike", w) for w in NEGATIVE_WEIGHTS]
    results = []
    with tempfile.TemporaryDirectory() as directory:
        for name, dislikes_as, weight in variants:
            folder = Path(directory) / dislikes_as
            if not (folder / "matrix").exists():
                interactions, products, window = _write_extract(ratings, dislikes_as, folder / "extract")
                build_matrix(interactions, products, window, folder / "matrix", params, IdTypes("str", "str", {}))
            split = holdout_split(folder / "matrix")
            fit = split.fit
            if weight is not None:
                cutoff = datetime.fromisoformat(split.manifest["holdout_cutoff"])
                fit = _with_negatives(fit, ratings, folder / "matrix", cutoff, weight)
            scores = []
            for seed in seeds:
                user_factors, item_factors = fit_als(
                    fit, params.factors, params.regularization, params.alpha, params.iterations, seed
                )
                lists = recommend_diverse_top_n(
                    als_model(user_factors, item_factors), split.users, split.exclude, params.k,
                    params.diversity_lambda, split.blocked_items,
                )
                metrics = ranking_metrics(lists, split.validation[split.users], params.k, n_catalog_items=fit.shape[1])
                scores.append((metrics.map, metrics.ndcg))
            maps, ndcgs = zip(*scores, strict=True)
            results.append({
                "variant": name, "map": float(np.mean(maps)), "ndcg_at_10": float(np.mean(ndcgs)),
                "map_per_seed": [round(m, 4) for m in maps], "holdout_users": len(split.users),
                "holdout_days": holdout_days,
            })
    return results


def negative_command(
    data: Annotated[Path, typer.Option(help="ml-100k folder (or its u.data file)", exists=True)],
    holdout_days: Annotated[list[int], typer.Option(help="temporal holdout(s), days")] = [30, 60],  # noqa: B006
    seeds: Annotated[int, typer.Option(min=1, help="ALS seeds averaged (42, 43, ...)")] = 3,
) -> None:
    """Dislikes counted as positives, not at all, or negatively: MAP@10 on temporal holdouts."""
    table = Table(title="MovieLens-100k, ratings <= 2 as dislikes: MAP@10 / nDCG@10 (temporal holdout)")
    for column in ("holdout", "users", "dislikes in training", "MAP@10", "nDCG@10", "MAP per seed"):
        table.add_column(column, justify="left" if column == "dislikes in training" else "right")
    for days in holdout_days:
        for row in measure(data, days, tuple(range(42, 42 + seeds))):
            table.add_row(f"{days} d", str(row["holdout_users"]), row["variant"], f"{row['map']:.4f}",
                          f"{row['ndcg_at_10']:.4f}", ", ".join(f"{m:.4f}" for m in row["map_per_seed"]))
    Console().print(table)
