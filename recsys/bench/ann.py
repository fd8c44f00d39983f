"""Approximate top-N (``recsys.ml.ann``) against exact ``rank_lists`` on the same users, factors
and exclusions, in the same process: recall@K of the approximate lists against the exact ones,
MAP@K of both against a holdout, and the speedup (exact seconds / approximate seconds, per
repeat, graph build apart). ``recsys bench speed`` reports it for its shop's holdout model
(``ann``); ``python -m recsys.bench.ann --items 1000000`` for synthetic item factors of any size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import scipy.sparse as sp

from recsys.core.params import PipelineParams
from recsys.ml.ann import ANN_LIBRARY, ItemIndexes, rank_lists_approximately
from recsys.ml.metrics import ranking_metrics
from recsys.ml.top_n import ItemVectors, blocked_mask, rank_lists

REPEATS = 3


def compare(
    user_factors: np.ndarray, item_factors: np.ndarray, exclude: sp.csr_matrix, relevant: sp.csr_matrix,
    blocked_items: np.ndarray, params: PipelineParams, repeats: int = REPEATS,
) -> dict:
    """Exact vs approximate lists of every row of ``user_factors`` (``exclude``, ``relevant``:
    one row each), K = ``params.k``, MMR with ``params.diversity_lambda`` as publish ranks."""
    items = ItemVectors.of(item_factors)
    kwargs = {"exclude": exclude, "blocked": blocked_mask(len(item_factors), blocked_items),
              "diversity_lambda": params.diversity_lambda}
    k = params.k
    indexes = ItemIndexes(item_factors)
    build_seconds = indexes.for_scale(None).build_seconds
    warm = slice(0, min(64, len(user_factors)))  # compiled kernels loaded before any clock
    rank_lists(user_factors[warm], items, k, **{**kwargs, "exclude": exclude[warm]})
    rank_lists_approximately(indexes, user_factors[warm], items, k, **{**kwargs, "exclude": exclude[warm]})
    exact_seconds, ann_seconds = [], []
    for _ in range(repeats):  # alternating, so a burst of load on the shared machine hits both
        start = time.perf_counter()
        exact = rank_lists(user_factors, items, k, **kwargs)
        exact_seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        approximate = rank_lists_approximately(indexes, user_factors, items, k, **kwargs)
        ann_seconds.append(time.perf_counter() - start)
    speedups = [e / a for e, a in zip(exact_seconds, ann_seconds, strict=True)]
    n_allowed = len(item_factors) - len(blocked_items)
    exact_map = ranking_metrics(exact, relevant, k, n_catalog_items=n_allowed).map
    ann_map = ranking_metrics(approximate, relevant, k, n_catalog_items=n_allowed).map
    hits = [len(set(a[a >= 0]) & set(e[e >= 0])) / max(1, int((e >= 0).sum())) for a, e in zip(approximate, exact, strict=True)]
    return {
        "library": ANN_LIBRARY, "items": len(item_factors), "users": len(user_factors), "k": k,
        "diversity_lambda": params.diversity_lambda,
        f"recall_at_{k}": round(float(np.mean(hits)), 5),
        "map_exact": round(exact_map, 6), "map_ann": round(ann_map, 6),
        # relative: (approximate - exact) / exact
        "map_delta": round((ann_map - exact_map) / exact_map, 5) if exact_map else None,
        "exact_users_per_s": round(len(user_factors) / statistics.median(exact_seconds), 1),
        "ann_users_per_s": round(len(user_factors) / statistics.median(ann_seconds), 1),
        "speedup": round(statistics.median(speedups), 3),
        "speedup_min": round(min(speedups), 3), "speedup_max": round(max(speedups), 3), "repeats": repeats,
        "build_seconds": round(build_seconds, 2),
    }


def on_run(run, params: PipelineParams, max_users: int, seed: int) -> dict:
    """``compare`` on a pipeline run's holdout model: the holdout users (up to ``max_users``),
    their history before the cutoff excluded, the inactive products blocked, MAP@K against what
    they did after it (the quality gate's protocol)."""
    from recsys.core.layout import FACTORS_HOLDOUT
    from recsys.ml.als import load_factors
    from recsys.pipeline.matrix import holdout_split

    split = holdout_split(run.paths.matrix)
    user_factors, item_factors = load_factors(run.paths.model / FACTORS_HOLDOUT)
    users = split.users
    if len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    figures = compare(user_factors[users], item_factors, split.exclude[users], split.validation[users],
                      split.blocked_items, params)
    figures["synthetic"] = False
    return figures


def synthetic(items: int, users: int, dims: int, seed: int, params: PipelineParams) -> dict:
    """``compare`` on generated factors (no shop of that size is trained): true tastes and items
    in clusters, item norms spread log-normally (as ALS leaves popular items longer); the model's
    factors are the true ones plus noise; each user's holdout is 3 of their 50 best items by the
    true factors, their history 15 random items."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(max(64, items // 4_000), dims)).astype(np.float32)

    def vectors(n: int, spread: float) -> np.ndarray:
        x = np.empty((n, dims), np.float32)
        for lo in range(0, n, 100_000):
            part = slice(lo, min(n, lo + 100_000))
            rows = centers[rng.integers(0, len(centers), part.stop - lo)]
            rows += 0.8 * rng.normal(size=rows.shape).astype(np.float32)
            rows /= np.linalg.norm(rows, axis=1, keepdims=True)
            x[part] = rows * rng.lognormal(0, spread, (len(rows), 1)).astype(np.float32)
        return x

    true_items, true_users = vectors(items, 0.5), vectors(users, 0.3)
    item_factors = true_items + 0.3 * rng.normal(size=true_items.shape).astype(np.float32)
    user_factors = true_users + 0.3 * rng.normal(size=true_users.shape).astype(np.float32)
    owned = rng.integers(0, items, (users, 15))  # scipy's sparse.random would draw from users × items
    history = sp.csr_matrix((np.ones(owned.size, np.float32), owned.ravel(), np.arange(0, owned.size + 1, 15)),
                            shape=(users, items))
    history.sum_duplicates()
    history.data[:] = 1
    best = rank_lists(true_users, ItemVectors.of(true_items), 50, exclude=history)
    held = np.take_along_axis(best, rng.random(best.shape).argsort(axis=1)[:, :3], axis=1)
    relevant = sp.csr_matrix((np.ones(held.size, np.float32), held.ravel(), np.arange(0, held.size + 1, 3)),
                             shape=(users, items))
    figures = compare(user_factors, item_factors, history, relevant, np.empty(0, np.int64), params)
    figures["synthetic"] = True
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--factors", type=int, default=PipelineParams().factors)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    print(json.dumps(synthetic(args.items, args.users, args.factors, args.seed, PipelineParams())))


if __name__ == "__main__":
    main()
