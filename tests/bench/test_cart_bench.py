"""The cart section of the quality benchmark on generated baskets (never the real MovieLens)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from recsys.bench import movielens
from recsys.bench.cart import evaluate_cart

SECONDS_PER_DAY = 86_400


def planted_pair_ratings(seed: int = 0, users: int = 300, days: int = 60, pairs: int = 40) -> pd.DataFrame:
    """Every user has a liked basket on a few days: one planted pair (items 2k and 2k + 1) plus a
    random item, and some random disliked ratings. Pair members are no more popular than the rest."""
    rng = np.random.default_rng(seed)
    n_items = 2 * pairs + 40
    rows = []
    for user in range(1, users + 1):
        for day in rng.choice(days, size=4, replace=False):
            at = 880_000_000 + int(day) * SECONDS_PER_DAY + int(rng.integers(0, 3_600))
            pair = 2 * int(rng.integers(pairs))
            for item in (pair, pair + 1, int(rng.integers(n_items))):
                rows.append((user, item + 1, 5, at))
            rows.append((user, int(rng.integers(n_items)) + 1, 2, at))
    ratings = pd.DataFrame(rows, columns=movielens.COLUMNS)
    return ratings.drop_duplicates(["user_id", "item_id"])


def test_bought_together_beats_popularity_on_planted_pairs():
    result = evaluate_cart(planted_pair_ratings(), seed=42)

    hit_rate = result["hit_rate_at_10"]
    assert result["test_baskets"] > 50 and result["train_baskets"] > result["test_baskets"]
    assert set(hit_rate) == {"bought_together", "similar", "popularity"}
    assert hit_rate["bought_together"] > 2 * hit_rate["popularity"]
    assert hit_rate["bought_together"] >= 0.5
