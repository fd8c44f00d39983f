"""MMR re-ranking and the beyond-accuracy metrics, on synthetic data checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp

from recsys.ml.diversity import (
    category_vectors,
    intra_list_diversity,
    mmr_rerank,
    novelty,
    recommend_diverse_top_n,
    unit_rows,
)
from recsys.ml.metrics import ranking_metrics
from recsys.ml.ranking import als_model, recommend_top_n


def random_model(users: int = 60, items: int = 80, factors: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    model = als_model(rng.normal(size=(users, factors)), rng.normal(size=(items, factors)))
    exclude = sp.random(users, items, density=0.1, format="csr", random_state=seed)
    exclude.data[:] = 1
    return model, exclude


def test_lambda_zero_is_todays_top_n_exactly():
    model, exclude = random_model()
    users = np.arange(60)
    blocked = np.array([3, 7])
    today, _ = recommend_top_n(model, users, exclude, 10, blocked)

    pool, scores = recommend_top_n(model, users, exclude, 40, blocked)
    reranked = mmr_rerank(pool, scores, 10, 0.0, unit_rows(model.item_factors))

    np.testing.assert_array_equal(reranked, today)
    np.testing.assert_array_equal(recommend_diverse_top_n(model, users, exclude, 10, 0.0, blocked), today)


def test_diverse_lists_keep_the_exclusions_and_differ_from_the_score_order():
    model, exclude = random_model()
    users = np.arange(60)
    blocked = np.array([3, 7])
    diverse = recommend_diverse_top_n(model, users, exclude, 10, 0.5, blocked)
    today, _ = recommend_top_n(model, users, exclude, 10, blocked)

    assert not np.isin(diverse, blocked).any()
    for user, row in enumerate(diverse):
        assert not set(row) & set(exclude[user].indices)
        assert len(set(row)) == 10
        assert row[0] == today[user, 0]  # the first pick is always the best-scored item
    assert (diverse != today).any()


def test_mmr_by_hand():
    # items 0 and 1 point the same way, item 2 is orthogonal to both
    vectors = unit_rows(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    candidates, scores = np.array([[0, 1, 2]]), np.array([[1.0, 0.9, 0.5]])
    # lambda 0.5: second slot, item 1 = 0.5 * 0.9 - 0.5 * 1 = -0.05 < item 2 = 0.5 * 0.5 - 0 = 0.25
    assert mmr_rerank(candidates, scores, 2, 0.5, vectors).tolist() == [[0, 2]]
    # lambda 0.1: item 1 = 0.9 * 0.9 - 0.1 = 0.71 > item 2 = 0.9 * 0.5 = 0.45
    assert mmr_rerank(candidates, scores, 2, 0.1, vectors).tolist() == [[0, 1]]


def test_short_candidate_lists_are_padded():
    vectors = unit_rows(np.eye(3))
    candidates, scores = np.array([[2, 0, -1, -1]]), np.array([[0.9, 0.8, -np.inf, -np.inf]])
    assert mmr_rerank(candidates, scores, 3, 0.5, vectors).tolist() == [[2, 0, -1]]
    assert mmr_rerank(candidates, scores, 3, 0.0, vectors).tolist() == [[2, 0, -1]]


def test_lambda_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="diversity_lambda"):
        mmr_rerank(np.array([[0, 1]]), np.array([[1.0, 0.5]]), 1, 1.5, np.eye(2))


def constructed_example(users: int = 20):
    """Every user's candidates rank the same 6 popular items of category a first, then 6 niche
    items of the user's own, alternating categories b and c. Diversifying can only swap shared
    items for a user's own ones (MMR guarantees no monotony in general: with niche items shared
    between users, a swap can also land on an item another list already holds)."""
    popular = np.arange(6)
    candidates = np.array([np.r_[popular, 6 + 6 * user + np.arange(6)] for user in range(users)])
    niche_categories = np.tile(["b", "c"], 3 * users)
    categories = np.r_[np.repeat("a", 6), niche_categories]
    scores = np.tile(1.0 - 0.04 * np.arange(12), (users, 1))
    return candidates, scores, unit_rows(category_vectors(categories))


def test_coverage_and_diversity_never_fall_as_lambda_grows():
    candidates, scores, vectors = constructed_example()
    relevant = sp.csr_matrix(np.ones((20, vectors.shape[0])))
    coverage, diversity = [], []
    for diversity_lambda in np.linspace(0, 1, 21):
        lists = mmr_rerank(candidates, scores, 4, diversity_lambda, vectors)
        coverage.append(ranking_metrics(lists, relevant, k=4).coverage)
        diversity.append(intra_list_diversity(lists, vectors))

    assert coverage == sorted(coverage) and diversity == sorted(diversity)
    assert coverage[0] == pytest.approx(4 / 126) and diversity[0] == 0.0  # the same four items of category a
    # at the top: popular 0, the user's best b and c; then every category is taken, every
    # candidate pays the same penalty and the 4th pick is by score again: popular 1
    assert coverage[-1] == pytest.approx((2 + 20 * 2) / 126)
    assert diversity[-1] == pytest.approx(5 / 6)  # of the 6 pairs, only (popular 0, popular 1) share a category


def test_intra_list_diversity_by_hand():
    vectors = unit_rows(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    # pairs (0,1): 1 - 0; (0,2) and (1,2): 1 - 1/sqrt(2); the one-item list is left out
    expected = (1 + 2 * (1 - 1 / math.sqrt(2))) / 3
    assert intra_list_diversity(np.array([[0, 1, 2], [1, -1, -1]]), vectors) == pytest.approx(expected)
    assert intra_list_diversity(np.array([[0, 1, -1]]), vectors) == pytest.approx(1.0)


def test_category_vectors_make_cosine_one_within_a_category_and_zero_across():
    vectors = unit_rows(category_vectors(["x", "y", "x", None]))
    assert (vectors @ vectors.T).tolist() == [[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]


def test_novelty_by_hand():
    # 8 users; item 0 is had by 4 (p = 1/2), item 1 by 2 (1/4), item 2 by 1 (1/8): 1, 2, 3 bits
    assert novelty(np.array([[0, 1], [2, -1]]), np.array([4, 2, 1, 0]), 8) == pytest.approx(2.0)


def test_a_continued_list_is_penalised_by_its_earlier_picks():
    # item 0 (already chosen) and item 1 point the same way; item 2 is orthogonal to both
    vectors = unit_rows(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    candidates, scores = np.array([[1, 2]]), np.array([[0.9, 0.5]])
    # relative to the list's top score 1.0: item 1 = 0.5 * 0.9 - 0.5 * 1 < item 2 = 0.5 * 0.5 - 0
    continued = mmr_rerank(candidates, scores, 2, 0.5, vectors, chosen=np.array([[0, -1]]), top_scores=np.array([1.0]))
    assert continued.tolist() == [[2, 1]]
    # without the earlier pick, the better-scored item 1 comes first
    assert mmr_rerank(candidates, scores, 2, 0.5, vectors).tolist() == [[1, 2]]
