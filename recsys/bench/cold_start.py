"""``recsys bench cold-start``: new arrivals in user lists, measured on a time split of MovieLens-100k.

The ratings before the split time (the ``1 - test_share`` quantile of the rating times) are the
window; every later rating is a test hit (any rating is relevant, as in the quality protocol,
but for a movie the user rated before the split). A movie first rated after the split is *new*:
no collaborative model can list it. The pipeline's own matrix stage builds the window's
matrices from the ratings (``rating`` events, value = the rating) and a catalogue of every movie
of ``u.item`` (title as name, first genre as category, ``{"genres": [...], "year": ...}`` as
attributes), so the new products and their content vectors are the ones publish would use. ALS
with the default params is fitted on the window (``full.npz``, as publish's model); each user of
the window with test ratings gets the plain top 10 (diversity off), then publish's own
``with_new_arrivals`` puts ``k`` new products in the last ``k`` slots.

Reported per ``k``: MAP@10 / nDCG@10 / P@10 on every test user, the new-product hit rate (the
share of users who rated a new movie after the split whose list holds at least one of them) and
the new-product hits per list; ``random`` arrivals (seeded) show what the content choice adds.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from datetime import UTC, datetime
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
from recsys.core.layout import EXCLUDE, FULL, ITEMS, USERS
from recsys.core.params import PipelineParams
from recsys.core.rules import RuleSnapshot
from recsys.core.window import Window
from recsys.ml.als import fit_als
from recsys.ml.content import place_new_arrivals
from recsys.ml.merchandising import Merchandising
from recsys.ml.metrics import hit_matrix, ranking_metrics
from recsys.ml.ranking import als_model, recommend_top_n
from recsys.pipeline.extract import INTERACTIONS_SCHEMA
from recsys.pipeline.matrix import build_matrix, load_ids
from recsys.pipeline.new_products import load_new_products
from recsys.pipeline.publish.new_arrivals import with_new_arrivals

K = 10
SLOTS = (0, 1, 2, 3)
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
TITLE_YEAR = re.compile(r"\s*\((\d{4})\)\s*$")


def _catalogue(data: Path) -> pa.Table:
    """Every movie of ``u.item`` as a products snapshot of the extract holds it."""
    table = pd.read_csv(data / "u.item", sep="|", header=None, encoding="latin-1")
    flags = table.iloc[:, -len(GENRES):].to_numpy(dtype=bool)
    names, attributes, categories = [], [], []
    for title, row in zip(table.iloc[:, 1].astype(str), flags, strict=True):
        year = TITLE_YEAR.search(title)
        genres = [genre for genre, flagged in zip(GENRES, row, strict=True) if flagged]
        names.append(TITLE_YEAR.sub("", title))
        attributes.append(json.dumps({"genres": genres, **({"year": year.group(1)} if year else {})}))
        categories.append(genres[0] if genres else None)
    return pa.table({
        "product_id": table.iloc[:, 0].astype(str), "name": names, "category": pa.array(categories, pa.string()),
        "active": [True] * len(table), "attributes": attributes,
    })


def _write_extract(window_ratings: pd.DataFrame, data: Path, directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "user_id": window_ratings["user_id"].astype(str), "product_id": window_ratings["item_id"].astype(str),
            "event_type": ["rating"] * len(window_ratings), "value": window_ratings["rating"].astype(np.float32),
            "occurred_at": pd.to_datetime(window_ratings["timestamp"], unit="s", utc=True),
        },
        schema=INTERACTIONS_SCHEMA,
    )
    pq.write_table(table, directory / "interactions.parquet")
    pq.write_table(_catalogue(data), directory / "products.parquet")
    return directory / "interactions.parquet", directory / "products.parquet"


def _random_arrivals(lists: np.ndarray, n_items: int, n_new: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = np.stack([rng.choice(n_new, size=min(k, n_new), replace=False) for _ in range(len(lists))]) + n_items
    return place_new_arrivals(lists, picks.astype(lists.dtype), np.zeros(lists.shape, dtype=bool))


def measure(data: Path, test_share: float, seed: int) -> dict:
    ratings = movielens.load_ratings(data)
    split = int(np.quantile(ratings["timestamp"], 1 - test_share))
    window_ratings, test = ratings[ratings["timestamp"] < split], ratings[ratings["timestamp"] >= split]
    start = datetime.fromtimestamp(int(ratings["timestamp"].min()) // 86400 * 86400, UTC)
    end = datetime.fromtimestamp(split, UTC)
    params = PipelineParams(
        lookback_days=(end - start).days + 1, holdout_days=1, event_weights={"rating": 1.0},
        exclude_event_types=("rating",), relevant_event_types=("rating",), seed=seed,
    )
    with tempfile.TemporaryDirectory() as directory:
        interactions, products = _write_extract(window_ratings, data, Path(directory) / "extract")
        matrix_dir = Path(directory) / "matrix"
        build_matrix(interactions, products, Window(start, end), matrix_dir, params, IdTypes("str", "str", {}))
        new = load_new_products(matrix_dir)
        user_ids, full = load_ids(matrix_dir / USERS), sp.load_npz(matrix_dir / FULL).tocsr()
        exclude = sp.load_npz(matrix_dir / EXCLUDE).tocsr()
        catalogue = [*load_ids(matrix_dir / ITEMS), *new.ids.to_pylist()]

    user_index, item_index = pd.Index(user_ids), pd.Index(catalogue)
    rows, columns = user_index.get_indexer(test["user_id"].astype(str)), item_index.get_indexer(test["item_id"].astype(str))
    known = (rows >= 0) & (columns >= 0)
    relevant = sp.csr_matrix(
        (np.ones(int(known.sum()), np.float32), (rows[known], columns[known])), shape=(len(user_ids), len(catalogue))
    )
    relevant.sum_duplicates()
    relevant.data[:] = 1
    users = np.flatnonzero(np.diff(relevant.indptr) > 0).astype(np.int32)
    relevant = relevant[users]
    new_relevant = relevant[:, new.n_items :]
    wants_new = np.diff(new_relevant.indptr) > 0

    user_factors, item_factors = fit_als(
        full, params.factors, params.regularization, params.alpha, params.iterations, params.seed
    )
    lists, _ = recommend_top_n(als_model(user_factors, item_factors), users, exclude, K)
    merchandising = Merchandising(RuleSnapshot(end), catalogue[: new.n_items], np.full(new.n_items, None))
    rows_out = []
    for k in SLOTS:
        variants = [("content", k)] if k == 0 else [("content", k), ("random", k)]
        for choice, slots in variants:
            if slots == 0:
                listed = lists
            elif choice == "content":
                listed = with_new_arrivals(
                    RuleSnapshot(end), merchandising, new, full, users, [user_ids[u] for u in users], lists, slots
                )
            else:
                listed = _random_arrivals(lists, new.n_items, len(new.ids), slots, seed)
            metrics = ranking_metrics(listed, relevant, K)
            new_hits = (hit_matrix(listed, relevant) & (listed >= new.n_items)).sum(axis=1)
            rows_out.append({
                "slots": slots, "arrivals": "none" if slots == 0 else choice,
                "map": metrics.map, "ndcg_at_10": metrics.ndcg, "precision_at_10": metrics.precision,
                "new_hit_rate": float((new_hits[wants_new] > 0).mean()) if wants_new.any() else 0.0,
                "new_hits_per_list": float(new_hits.mean()),
            })
    return {
        "protocol": {
            "split": datetime.fromtimestamp(split, UTC).isoformat(), "test_share": test_share, "seed": seed,
            "window_ratings": len(window_ratings), "test_ratings": len(test), "test_users": len(users),
            "items": new.n_items, "new_products": len(new.ids),
            "new_products_rated_in_test": int((np.diff(new_relevant.tocsc().indptr) > 0).sum()),
            "users_rating_a_new_product": int(wants_new.sum()),
            "test_ratings_on_new_products": int(new_relevant.nnz),
        },
        "results": rows_out,
    }


def results_table(result: dict) -> Table:
    table = Table(title=f"New arrivals on MovieLens-100k, time split at {result['protocol']['split']}")
    for column in ("slots", "arrivals", "MAP@10", "nDCG@10", "P@10", "new-product hit rate", "new hits / list"):
        table.add_column(column, justify="right")
    for row in result["results"]:
        table.add_row(
            str(row["slots"]), row["arrivals"], f"{row['map']:.4f}", f"{row['ndcg_at_10']:.4f}",
            f"{row['precision_at_10']:.4f}", f"{row['new_hit_rate']:.4f}", f"{row['new_hits_per_list']:.4f}",
        )
    return table


def cold_start_command(
    data: Annotated[Path, typer.Option(help="ml-100k folder (u.data and u.item)", exists=True, file_okay=False)],
    test_share: Annotated[float, typer.Option(min=0.01, max=0.9, help="share of the ratings, the latest, that are the test")] = 0.2,
    seed: Annotated[int, typer.Option(help="ALS and random-arrivals seed")] = 42,
    json_output: Annotated[bool, typer.Option("--json", help="end stdout with one JSON object")] = False,
) -> None:
    """New-arrival slots on a time split of MovieLens-100k: the new-product hit rate they buy and
    what they cost in MAP@10 (docs/quality.md#new-products)."""
    result = measure(data, test_share, seed)
    console = Console(file=sys.stderr if json_output else sys.stdout)
    console.print(json.dumps(result["protocol"]))
    console.print(results_table(result))
    if json_output:
        print(json.dumps(result))
