"""Why a product is in a user's list: the user's past products that weigh most in its score (ALS:
``recsys.ml.explain``; EASE and item-kNN: the terms of X·S), in the shape the API and the look-up
page show. BPR and blend versions explain nothing."""

from __future__ import annotations

import scipy.sparse as sp

from recsys.ml.explain import explain_items
from recsys.serving.live_model import LiveModel
from recsys.serving.schemas import EXPLAIN_N, ProductId


def explained_products(live: LiveModel, row: sp.csr_matrix, products: list[ProductId]) -> list[dict]:
    """Per product (of the live catalogue), its score for the history ``row`` (1 × items, the
    weights the model was fitted on or a fold-in's) and the ``EXPLAIN_N`` past products that
    contribute most to it."""
    items = [live.item_index[str(product)] for product in products]
    params = live.params
    if live.model is not None:
        explained = explain_items(live.model.item_factors, row, items, params.regularization, params.alpha, EXPLAIN_N)
    elif live.recommender is not None and hasattr(live.recommender, "explain"):  # item-item families: the score is a sum over past items
        explained = live.recommender.explain(row, items, EXPLAIN_N)
    else:  # BPR and blends have no per-item decomposition of their scores
        return []
    return [
        {
            "product_id": live.product_out(entry.item), "score": entry.score,
            "because": [{"product_id": live.product_out(past), "contribution": part} for past, part in entry.contributions],
        }
        for entry in explained
    ]
