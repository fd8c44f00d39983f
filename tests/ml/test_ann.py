"""Approximate top-N (recsys.ml.ann): candidates re-scored exactly give the exact lists whenever
they cover the user's pool; the HNSW candidates keep every exclusion and recall the exact lists."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp
from test_top_n import reference_lists, shop

from recsys.core.errors import InputError
from recsys.core.params import PipelineParams
from recsys.core.rules import Rule, RuleSnapshot
from recsys.ml import ann
from recsys.ml.ann import ItemIndexes, rank_lists_approximately
from recsys.ml.families import Als
from recsys.ml.merchandising import Merchandising
from recsys.ml.top_n import USER_BLOCK, ItemVectors, rank_lists
from recsys.pipeline.publish.stage import _ruled_top_n


def clustered_shop(users: int, items: int, dims: int = 32, seed: int = 0):
    """Factors as ALS leaves them: tastes in clusters, norms spread (popular items longer)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(64, dims))

    def vectors(n: int, spread: float) -> np.ndarray:
        x = centers[rng.integers(0, len(centers), n)] + 0.8 * rng.normal(size=(n, dims))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return (x * rng.lognormal(0, spread, (n, 1))).astype(np.float32)

    exclude = sp.random(users, items, density=15 / items, format="csr", random_state=seed, dtype=np.float32)
    exclude.data[:] = 1
    return vectors(users, 0.3), vectors(items, 0.5), exclude


def recall(approximate: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a[a >= 0]) & set(e[e >= 0])) / max(1, (e >= 0).sum())
                          for a, e in zip(approximate, exact, strict=True)]))


@pytest.mark.parametrize("diversity_lambda", [0.0, 0.3])
def test_every_item_as_candidate_gives_the_exact_lists(diversity_lambda: float):
    """A brute-force index: each user's candidates are the whole catalogue, shuffled, some twice."""
    user_factors, item_factors, exclude, blocked, factors = shop(users=2 * USER_BLOCK + 44)
    rng = np.random.default_rng(1)
    everything = np.stack([rng.permutation(len(item_factors)) for _ in range(len(user_factors))])
    candidates = np.hstack([everything, everything[:, :50], np.full((len(user_factors), 3), -1)])
    kwargs = {"exclude": exclude, "blocked": blocked, "factors": factors, "diversity_lambda": diversity_lambda,
              "first": 10}

    lists = rank_lists(user_factors, ItemVectors.of(item_factors), 13, candidates=candidates, **kwargs)

    np.testing.assert_array_equal(lists, rank_lists(user_factors, ItemVectors.of(item_factors), 13, **kwargs))
    np.testing.assert_array_equal(lists, reference_lists(user_factors, item_factors, 13, **kwargs))


def test_candidates_covering_the_pool_give_the_exact_lists():
    """Each user's best-scored allowed items, as many as the pool and the heap's slack, plus
    their own and blocked items (as an index returns them) and random others: the exact lists."""
    user_factors, item_factors, exclude, blocked, factors = shop(users=200)
    scores = (user_factors.astype(np.float64) @ item_factors.T.astype(np.float64)) * factors
    scores[:, blocked] = -np.inf
    scores[exclude.nonzero()] = -np.inf
    best = np.argsort(-scores, axis=1, kind="stable")[:, : 4 * 10 + ann._SLACK]
    rng = np.random.default_rng(2)
    owned = exclude.toarray() > 0
    candidates = np.hstack([
        best, rng.integers(0, len(item_factors), (len(user_factors), 30)),
        np.tile(np.flatnonzero(blocked), (len(user_factors), 1)),
        np.stack([np.flatnonzero(row)[:5] if row.sum() >= 5 else np.full(5, -1) for row in owned]),
    ])
    kwargs = {"exclude": exclude, "blocked": blocked, "factors": factors, "diversity_lambda": 0.3}
    items = ItemVectors.of(item_factors)

    np.testing.assert_array_equal(rank_lists(user_factors, items, 10, candidates=candidates, **kwargs),
                                  rank_lists(user_factors, items, 10, **kwargs))


def test_too_few_candidates_leave_the_list_short_never_filled_with_excluded_items():
    user_factors, item_factors, exclude, blocked, _ = shop(users=30)
    candidates = np.tile(np.arange(12), (30, 1))

    lists = rank_lists(user_factors, ItemVectors.of(item_factors), 10, exclude=exclude, blocked=blocked,
                       candidates=candidates)

    for row, listed in enumerate(lists):
        allowed = set(range(12)) - set(exclude[row].indices) - set(np.flatnonzero(blocked))
        assert set(listed[listed >= 0]) == set(sorted(allowed, key=lambda i: -float(user_factors[row] @ item_factors[i]))[:10])


@pytest.mark.parametrize("diversity_lambda", [0.0, 0.3])
def test_hnsw_candidates_recall_the_exact_lists_and_keep_every_exclusion(diversity_lambda: float):
    user_factors, item_factors, exclude = clustered_shop(users=600, items=20_000)
    rng = np.random.default_rng(5)
    blocked = np.zeros(len(item_factors), dtype=bool)
    blocked[rng.choice(len(item_factors), 1_000, replace=False)] = True
    items = ItemVectors.of(item_factors)
    index = ItemIndexes(item_factors)
    kwargs = {"exclude": exclude, "blocked": blocked, "diversity_lambda": diversity_lambda}

    approximate = rank_lists_approximately(index, user_factors, items, 10, **kwargs)
    exact = rank_lists(user_factors, items, 10, **kwargs)

    assert recall(approximate, exact) >= 0.99
    assert (approximate >= 0).all()
    for row, listed in enumerate(approximate):
        assert not set(listed) & (set(exclude[row].indices) | set(np.flatnonzero(blocked)))
        assert len(set(listed)) == 10


def test_boosted_items_reach_the_lists_and_heavy_users_are_ranked_exactly(monkeypatch):
    """The graph is built over the factors as the rules scale them: items no user scores near
    the top, boosted, are listed as the exact ranking lists them."""
    user_factors, item_factors, exclude = clustered_shop(users=300, items=5_000)
    items = ItemVectors.of(item_factors)
    factors = np.ones(len(item_factors), np.float32)
    factors[np.argsort((user_factors @ item_factors.T).mean(axis=0))[-300:]] = 0.2  # the usual best, buried
    boosted = np.argsort(np.linalg.norm(item_factors, axis=1))[:200]  # the shortest vectors, boosted
    factors[boosted] = 25.0
    monkeypatch.setattr(ann, "MAX_EXCLUDED", 20)  # users owning more than 20 items: exact
    exclude = exclude.tolil()
    exclude[:10, :40] = 1
    exclude = exclude.tocsr()

    approximate = rank_lists_approximately(ItemIndexes(item_factors), user_factors, items, 10, exclude=exclude,
                                           factors=factors)
    exact = rank_lists(user_factors, items, 10, exclude=exclude, factors=factors)

    np.testing.assert_array_equal(approximate[:10], exact[:10])
    assert recall(approximate, exact) >= 0.99
    assert np.isin(exact, boosted).mean() > 0.5  # the boost did change the lists


def test_ann_params_are_validated():
    assert PipelineParams.from_dict({"ann_scoring": True, "ann_min_items": 1}).ann_scoring is True
    with pytest.raises(InputError, match="ann_min_items must be >= 1, got 0"):
        PipelineParams(ann_min_items=0)
    with pytest.raises(InputError, match="ann_scoring must be true or false, got 'yes'"):
        PipelineParams.from_dict({"ann_scoring": "yes"})


def test_publish_ranks_approximately_only_from_the_threshold_on():
    user_factors, item_factors, exclude = clustered_shop(users=400, items=4_000)
    ids = [f"p{i}" for i in range(len(item_factors))]
    rules = RuleSnapshot(taken_at=datetime.now(UTC), rules=(
        Rule(rule_id=1, kind="pin", product_id="p7", rank=2),
        Rule(rule_id=2, kind="bury", product_id="p9", factor=0.2),
        Rule(rule_id=3, kind="boost", product_id="p11", factor=3.0),
    ))
    merchandising = Merchandising(rules, ids, np.array(["c"] * len(ids), dtype=object))
    users = np.arange(len(user_factors), dtype=np.int32)
    user_ids = pa.array([f"u{u}" for u in users])
    inactive = np.arange(100, 200)

    def ranked(**params) -> np.ndarray:
        return _ruled_top_n(merchandising, Als(user_factors=user_factors, item_factors=item_factors), None, user_ids,
                           users, exclude, inactive,
                           PipelineParams(**params), None)

    exact = ranked()
    np.testing.assert_array_equal(ranked(ann_scoring=True, ann_min_items=len(ids) - 100 + 1), exact)  # below: exact
    approximate = ranked(ann_scoring=True, ann_min_items=len(ids) - 100)
    assert recall(approximate, exact) >= 0.99
    owned = exclude.toarray() > 0
    for row, listed in enumerate(approximate):
        assert not set(listed) & set(inactive)
        assert not owned[row, listed].any()
        assert listed[1] == 7 or owned[row, 7]  # the pin at position 2
