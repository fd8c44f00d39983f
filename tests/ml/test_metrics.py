"""ranking_metrics against hand-computed cases and against implicit's own evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
from implicit.evaluation import ranking_metrics_at_k

from recsys.ml.metrics import ranking_metrics
from recsys.ml.ranking import als_model, recommend_top_n


def relevance(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    users = [u for u, items in enumerate(rows) for _ in items]
    items = [i for row in rows for i in row]
    return sp.csr_matrix((np.ones(len(items)), (users, items)), shape=(len(rows), n_items))


def test_hand_computed_two_users():
    # user 0: relevant {1, 3, 5, 7}; top 3 = [1, 2, 3] -> hits at ranks 1 and 3
    # user 1: relevant {4};          top 3 = [0, 4, -1] -> hit at rank 2, a padded slot
    recommended = np.array([[1, 2, 3], [0, 4, -1]])
    relevant = relevance([[1, 3, 5, 7], [4]], n_items=8)
    log2 = math.log2

    result = ranking_metrics(recommended, relevant, k=3)

    ap0, ap1 = (1 / 1 + 2 / 3) / 4, (1 / 2) / 1
    ndcg0 = (1 / log2(2) + 1 / log2(4)) / (1 / log2(2) + 1 / log2(3) + 1 / log2(4))
    ndcg1 = (1 / log2(3)) / (1 / log2(2))
    assert result.users == 2
    assert result.precision == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert result.recall == pytest.approx((2 / 4 + 1 / 1) / 2)
    assert result.map == pytest.approx((ap0 + ap1) / 2)
    assert result.ndcg == pytest.approx((ndcg0 + ndcg1) / 2)
    assert result.coverage == pytest.approx(5 / 8)  # items 0-4 appear somewhere; -1 is padding


def test_map_denominators_differ_only_when_relevant_exceeds_k():
    recommended = np.array([[0, 1], [2, 3]])
    relevant = relevance([[0, 5, 6], [3]], n_items=7)  # 3 > k relevant, then 1 <= k

    all_items = ranking_metrics(recommended, relevant, k=2, map_denominator="all")
    min_k = ranking_metrics(recommended, relevant, k=2, map_denominator="min_k")

    assert all_items.map == pytest.approx((1 / 3 + (1 / 2) / 1) / 2)
    assert min_k.map == pytest.approx((1 / 2 + (1 / 2) / 1) / 2)


def test_users_without_relevant_items_are_not_averaged():
    recommended = np.array([[0, 1], [0, 1]])
    relevant = relevance([[0], []], n_items=3)

    result = ranking_metrics(recommended, relevant, k=2)

    assert result.users == 1
    assert result.precision == pytest.approx(0.5)


def random_problem(seed: int, n_users: int, n_items: int, train_per_user: int, test_per_user: int):
    rng = np.random.default_rng(seed)
    train_rows, test_rows = [], []
    for _ in range(n_users):
        items = rng.choice(n_items, train_per_user + test_per_user, replace=False)
        train_rows.append(sorted(items[:train_per_user]))
        test_rows.append(sorted(items[train_per_user:]))
    model = als_model(
        rng.standard_normal((n_users, 8)).astype(np.float32), rng.standard_normal((n_items, 8)).astype(np.float32)
    )
    return model, relevance(train_rows, n_items), relevance(test_rows, n_items)


def implicit_metrics(model, train: sp.csr_matrix, test: sp.csr_matrix, k: int) -> dict[str, float]:
    return ranking_metrics_at_k(model, train, test, K=k, show_progress=False)


@pytest.mark.parametrize("test_per_user", [12, 30])
def test_agrees_with_implicit_when_every_user_has_k_relevant(test_per_user):
    # implicit's precision divides by min(K, relevant) (micro-averaged): equal to ours when all have >= K
    k = 10
    model, train, test = random_problem(seed=test_per_user, n_users=60, n_items=120, train_per_user=15, test_per_user=test_per_user)
    recommended, _ = recommend_top_n(model, np.arange(60), train, k)

    ours = ranking_metrics(recommended, test, k, map_denominator="min_k")
    theirs = implicit_metrics(model, train, test, k)

    assert ours.precision == pytest.approx(theirs["precision"], abs=1e-12)
    assert ours.map == pytest.approx(theirs["map"], abs=1e-12)
    assert ours.ndcg == pytest.approx(theirs["ndcg"], abs=1e-12)


def test_ndcg_and_min_k_map_agree_with_implicit_for_few_relevant_items():
    k = 10
    model, train, test = random_problem(seed=3, n_users=80, n_items=100, train_per_user=20, test_per_user=3)
    recommended, _ = recommend_top_n(model, np.arange(80), train, k)

    ours = ranking_metrics(recommended, test, k, map_denominator="min_k")
    theirs = implicit_metrics(model, train, test, k)

    assert ours.map == pytest.approx(theirs["map"], abs=1e-12)
    assert ours.ndcg == pytest.approx(theirs["ndcg"], abs=1e-12)
    # here implicit's precision is hits / min(K, relevant) = ours * K / 3
    assert ours.precision * k / 3 == pytest.approx(theirs["precision"], abs=1e-12)
