"""The cart section of ``recsys bench quality`` and ``recsys bench cart``: hit rate@10 of a
held-out basket item given the rest of its basket, for the blend, bought together, similar
products and popularity.

- **Basket:** one user's ratings >= 4 on one UTC day. A proxy: MovieLens has ratings, not
  purchases, and a day of liked films is the nearest thing it has to a shopping trip.
- **Temporal split:** the days before the day by which ``train_fraction`` of the ratings were
  given are training (co-purchase statistics, ALS factors, popularity); the baskets of the later
  days with at least two items are the test baskets.
- **Held out:** one item per test basket, drawn with the seed; the rest of the basket is the cart.
  A basket whose held-out item never occurs in training is left out: no method could name it.
- **Methods:** ``blend`` (what ``POST /carts/recommendations`` answers, ``blend_cart``): the cart
  items' bought-together lists (the pipeline's params and code, ``recsys.ml.co_purchase``) and
  their similar lists (ALS on training with the pipeline's default params) merged in one
  reciprocal-rank vote, the co-purchase votes weighted ``BOUGHT_TOGETHER_WEIGHT``, then
  popularity; ``blend_w<w>``: the same with weight ``w`` (only when asked for, and not for the
  default weight); ``bought_together``:
  the bought-together lists merged, then the similar lists, then popularity, in turn;
  ``similar``: the similar lists merged, then popularity; ``popularity``: most liked in training.
  Each list is 10 long and never holds a cart item; a hit is the held-out item in it.
- **``recsys bench cart``:** the same over several seeds (each seed draws the held-out items and
  fits ALS), and with ``--validation`` on the ratings before the test days only, split again
  (training the first ``VALIDATION_FRACTION`` of its days): the blend weight is chosen there, not
  on the test baskets.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import scipy.sparse as sp
import typer
from rich.console import Console
from rich.table import Table

from recsys.bench import movielens
from recsys.core.params import PipelineParams
from recsys.ml.als import fit_als
from recsys.ml.co_purchase import (
    BOUGHT_TOGETHER_WEIGHT,
    basket_keys,
    basket_matrix,
    blend_cart,
    bought_together,
    rank_cart,
)
from recsys.ml.top_n import ItemVectors, similar_items
from recsys.ml.weighting import scale_confidence

K = 10
LIKED = 4  # a rating at least this high joins the day's basket
SECONDS_PER_DAY = 86_400
METHODS = ("blend", "bought_together", "similar", "popularity")
TRAIN_FRACTION = 0.8
VALIDATION_FRACTION = 0.75  # of the training days, with --validation


def _lists(matrix: np.ndarray, items: list[int]) -> list[list[int]]:
    return [[int(i) for i in matrix[item] if i >= 0] for item in items]


def blend_name(weight: float) -> str:
    return f"blend_w{weight:g}"


def split_days(ratings: pd.DataFrame, train_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """The ratings of the days before the day by which ``train_fraction`` of them were given, the
    rest, and that day (days since 1970, UTC)."""
    day = ratings["timestamp"].to_numpy() // SECONDS_PER_DAY
    cutoff_day = int(np.quantile(day, train_fraction))
    return ratings[day < cutoff_day], ratings[day >= cutoff_day], cutoff_day


def evaluate_cart(
    ratings: pd.DataFrame,
    seed: int,
    params: PipelineParams | None = None,
    train_fraction: float = TRAIN_FRACTION,
    blend_weights: Sequence[float] = (),
) -> dict:
    """Hit rate@10 per method on the test baskets of ``ratings`` (u.data columns: user_id,
    item_id, rating, timestamp in epoch seconds); ``blend_weights``: more blends, ``blend_w<w>``."""
    params = params or PipelineParams()
    train, test, cutoff_day = split_days(ratings, train_fraction)
    item_ids = np.unique(train["item_id"].to_numpy())  # only items seen in training can be recommended
    user_ids = np.unique(train["user_id"].to_numpy())
    n_items = len(item_ids)

    liked = train[train["rating"] >= LIKED]
    baskets = basket_matrix(
        basket_keys(np.searchsorted(user_ids, liked["user_id"]), liked["timestamp"].to_numpy() // SECONDS_PER_DAY),
        np.searchsorted(item_ids, liked["item_id"]),
        n_items,
    )
    weights = sp.csr_matrix(
        (train["rating"].to_numpy(np.float32), (np.searchsorted(user_ids, train["user_id"]), np.searchsorted(item_ids, train["item_id"]))),
        shape=(len(user_ids), n_items),
    )
    user_factors, item_factors = fit_als(
        scale_confidence(weights, params.confidence_scaling), params.factors, params.regularization, params.alpha,
        params.iterations, seed,
    )
    every_item = np.arange(n_items, dtype=np.int32)
    similar = similar_items(ItemVectors.of(item_factors), every_item, params.bought_together_n)
    together = bought_together(baskets, every_item, similar, params.bought_together_n, params.bought_together_min_support)
    popular = [int(i) for i in np.argsort(-np.asarray(baskets.sum(axis=0)).ravel(), kind="stable")]

    test_liked = test[test["rating"] >= LIKED]
    test_keys = basket_keys(test_liked["user_id"].to_numpy(), test_liked["timestamp"].to_numpy() // SECONDS_PER_DAY)
    rng = np.random.default_rng(seed)
    # the default weight is ``blend`` itself
    blend_weights = [w for w in dict.fromkeys(blend_weights) if w != BOUGHT_TOGETHER_WEIGHT]
    methods = (*METHODS, *(blend_name(w) for w in blend_weights))
    hits = dict.fromkeys(methods, 0)
    evaluated = 0
    for _, basket in test_liked.groupby(test_keys, sort=True):
        products = np.unique(basket["item_id"].to_numpy())
        if len(products) < 2:
            continue
        held_out = products[rng.integers(len(products))]
        if not np.isin(held_out, item_ids):
            continue
        rest = products[(products != held_out) & np.isin(products, item_ids)]
        cart = [int(i) for i in np.searchsorted(item_ids, rest)]
        target = int(np.searchsorted(item_ids, held_out))
        together_lists, similar_lists = _lists(together, cart), _lists(similar, cart)
        answers = {
            "blend": blend_cart(together_lists, similar_lists, K, cart, then=[("popularity", [popular])])[0],
            "bought_together": rank_cart(
                [("bought_together", together_lists), ("similar", similar_lists), ("popularity", [popular])], K, cart,
            )[0],
            "similar": rank_cart([("similar", similar_lists), ("popularity", [popular])], K, cart)[0],
            "popularity": rank_cart([("popularity", [popular])], K, cart)[0],
        }
        for weight in blend_weights:
            answers[blend_name(weight)] = blend_cart(
                together_lists, similar_lists, K, cart, then=[("popularity", [popular])], weight=weight,
            )[0]
        evaluated += 1
        for method, answer in answers.items():
            hits[method] += target in answer
    return {
        "basket": f"one user's ratings >= {LIKED} on one UTC day (a proxy: MovieLens has no purchases)",
        "train_days_before": pd.Timestamp(cutoff_day * SECONDS_PER_DAY, unit="s", tz="UTC").date().isoformat(),
        "train_baskets": int(baskets.shape[0]),
        "test_baskets": evaluated,
        "blend_weight": BOUGHT_TOGETHER_WEIGHT,
        f"hit_rate_at_{K}": {method: round(hits[method] / evaluated, 4) if evaluated else None for method in methods},
    }


def measure(
    ratings: pd.DataFrame, seeds: Sequence[int], blend_weights: Sequence[float] = (), validation: bool = False
) -> dict:
    """``evaluate_cart`` once per seed; with ``validation``, on the days before the test days only."""
    train_fraction = TRAIN_FRACTION
    if validation:
        ratings, _, _ = split_days(ratings, TRAIN_FRACTION)
        train_fraction = VALIDATION_FRACTION
    runs = {seed: evaluate_cart(ratings, seed, train_fraction=train_fraction, blend_weights=blend_weights) for seed in seeds}
    first = next(iter(runs.values()))
    methods = list(first[f"hit_rate_at_{K}"])
    return {
        "split": "validation" if validation else "test",
        "train_days_before": first["train_days_before"],
        "seeds": list(seeds),
        "test_baskets": {seed: run["test_baskets"] for seed, run in runs.items()},
        f"hit_rate_at_{K}": {
            method: {seed: run[f"hit_rate_at_{K}"][method] for seed, run in runs.items()} for method in methods
        },
        "mean": {
            method: round(float(np.mean([run[f"hit_rate_at_{K}"][method] for run in runs.values()])), 4)
            for method in methods
        },
    }


def cart_command(
    data: Annotated[Path, typer.Option(help="ml-100k folder (or its u.data file)", exists=True)],
    seeds: Annotated[int, typer.Option(min=1, help="seeds 42, 43, ...: held-out items and ALS")] = 10,
    weight: Annotated[list[float], typer.Option(help="also blends with this bought-together weight")] = [0.5, 2.0],  # noqa: B006
    validation: Annotated[bool, typer.Option(help="on the days before the test days only (choose weights here)")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="end stdout with one JSON object")] = False,
) -> None:
    """Cart hit rate@10 per method and seed: the blend, bought together, similar, popularity."""
    result = measure(movielens.load_ratings(data), tuple(range(42, 42 + seeds)), weight, validation)
    baskets = sorted(set(result["test_baskets"].values()))
    table = Table(title=f"Cart hit rate@10 ({result['split']} split, training before {result['train_days_before']}; "
                  f"{baskets[0]}..{baskets[-1]} baskets per seed)")
    table.add_column("method")
    table.add_column("mean", justify="right")
    table.add_column(f"per seed ({', '.join(map(str, result['seeds']))})")
    for method, per_seed in result[f"hit_rate_at_{K}"].items():
        table.add_row(method, f"{result['mean'][method]:.4f}", ", ".join(f"{per_seed[s]:.4f}" for s in result["seeds"]))
    table.add_row("test baskets", "", ", ".join(str(result["test_baskets"][s]) for s in result["seeds"]))
    Console().print(table)
    if json_output:
        sys.stdout.write(json.dumps(result) + "\n")
