"""The cart section of ``recsys bench quality``: hit rate@10 of a held-out basket item given the
rest of its basket, for bought together, similar products and popularity.

- **Basket:** one user's ratings >= 4 on one UTC day. A proxy: MovieLens has ratings, not
  purchases, and a day of liked films is the nearest thing it has to a shopping trip.
- **Temporal split:** the days before the day by which ``train_fraction`` of the ratings were
  given are training (co-purchase statistics, ALS factors, popularity); the baskets of the later
  days with at least two items are the test baskets.
- **Held out:** one item per test basket, drawn with the seed; the rest of the basket is the cart.
  A basket whose held-out item never occurs in training is left out: no method could name it.
- **Methods, as ``POST /carts/recommendations`` answers:** ``bought_together``: the cart items'
  bought-together lists (the pipeline's params and code, ``recsys.ml.co_purchase``) merged, then
  their similar lists, then popularity; ``similar``: their similar lists (ALS on training with the
  pipeline's default params) merged, then popularity; ``popularity``: most liked in training.
  Each list is 10 long and never holds a cart item; a hit is the held-out item in it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recsys.core.params import PipelineParams
from recsys.ml.als import fit_als
from recsys.ml.co_purchase import basket_keys, basket_matrix, bought_together, rank_cart
from recsys.ml.ranking import als_model, similar_items
from recsys.ml.weighting import scale_confidence

K = 10
LIKED = 4  # a rating at least this high joins the day's basket
SECONDS_PER_DAY = 86_400
METHODS = ("bought_together", "similar", "popularity")


def _lists(matrix: np.ndarray, items: list[int]) -> list[list[int]]:
    return [[int(i) for i in matrix[item] if i >= 0] for item in items]


def evaluate_cart(ratings: pd.DataFrame, seed: int, params: PipelineParams | None = None, train_fraction: float = 0.8) -> dict:
    """Hit rate@10 per method on the test baskets of ``ratings`` (u.data columns: user_id,
    item_id, rating, timestamp in epoch seconds)."""
    params = params or PipelineParams()
    day = ratings["timestamp"].to_numpy() // SECONDS_PER_DAY
    cutoff_day = int(np.quantile(day, train_fraction))
    train, test = ratings[day < cutoff_day], ratings[day >= cutoff_day]
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
    similar = similar_items(als_model(user_factors, item_factors), every_item, params.bought_together_n)
    together = bought_together(baskets, every_item, similar, params.bought_together_n, params.bought_together_min_support)
    popular = [int(i) for i in np.argsort(-np.asarray(baskets.sum(axis=0)).ravel(), kind="stable")]

    test_liked = test[test["rating"] >= LIKED]
    test_keys = basket_keys(test_liked["user_id"].to_numpy(), test_liked["timestamp"].to_numpy() // SECONDS_PER_DAY)
    rng = np.random.default_rng(seed)
    hits = dict.fromkeys(METHODS, 0)
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
        answers = {
            "bought_together": rank_cart(
                [("bought_together", _lists(together, cart)), ("similar", _lists(similar, cart)), ("popularity", [popular])],
                K, cart,
            )[0],
            "similar": rank_cart([("similar", _lists(similar, cart)), ("popularity", [popular])], K, cart)[0],
            "popularity": rank_cart([("popularity", [popular])], K, cart)[0],
        }
        evaluated += 1
        for method, answer in answers.items():
            hits[method] += target in answer
    return {
        "basket": f"one user's ratings >= {LIKED} on one UTC day (a proxy: MovieLens has no purchases)",
        "train_days_before": pd.Timestamp(cutoff_day * SECONDS_PER_DAY, unit="s", tz="UTC").date().isoformat(),
        "train_baskets": int(baskets.shape[0]),
        "test_baskets": evaluated,
        f"hit_rate_at_{K}": {method: round(hits[method] / evaluated, 4) if evaluated else None for method in METHODS},
    }
