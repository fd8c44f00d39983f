"""Co-purchase statistics, complements, the similarity fill and the cart merge, on baskets small
enough to check by hand."""

from __future__ import annotations

import random

import numpy as np
import pytest
import scipy.sparse as sp

from recsys.ml.co_purchase import (
    basket_keys,
    basket_matrix,
    blend_cart,
    bought_together,
    co_purchase,
    complements,
    fill_from,
    merge_ranked_lists,
    rank_cart,
    top_per_row,
    vote_ranked_lists,
)

# five baskets over items 0..3: {0,1} {0,1,2} {0,2} {1,3} {3}
# n = [3, 3, 2, 2], N = 5; s(0,1) = 2, s(0,2) = 2, s(1,2) = 1, s(1,3) = 1, s(0,3) = s(2,3) = 0
BASKETS = sp.csr_matrix(
    np.array([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 0, 1]], dtype=np.float32)
)


def dense(matrix: sp.csr_matrix) -> np.ndarray:
    return matrix.toarray()


def test_a_basket_is_one_users_purchases_on_one_day():
    users = np.array([0, 0, 0, 1, 1, 0])
    days = np.array([20_000, 20_000, 20_001, 20_000, 20_000, 20_000])
    items = np.array([5, 6, 5, 5, 7, 6])  # the last row repeats user 0's item 6 on day 20000

    baskets = basket_matrix(basket_keys(users, days), items, n_items=8)

    assert sorted(tuple(np.flatnonzero(row)) for row in baskets.toarray()) == [(5,), (5, 6), (5, 7)]
    assert set(baskets.data) == {1}


def test_support_confidence_and_lift_by_hand():
    stats = co_purchase(BASKETS)

    assert stats.baskets == 5
    assert stats.item_baskets.tolist() == [3, 3, 2, 2]
    assert dense(stats.support).tolist() == [[0, 2, 2, 0], [2, 0, 1, 1], [2, 1, 0, 0], [0, 1, 0, 0]]
    confidence = dense(stats.confidence())
    assert confidence[0, 1] == pytest.approx(2 / 3) and confidence[2, 0] == pytest.approx(1.0)
    assert confidence[1, 3] == pytest.approx(1 / 3) and confidence[3, 1] == pytest.approx(1 / 2)
    lift = dense(stats.lift())
    assert lift[0, 1] == pytest.approx(2 * 5 / (3 * 3))
    assert lift[0, 2] == pytest.approx(2 * 5 / (3 * 2)) == pytest.approx(lift[2, 0])
    assert lift[1, 2] == pytest.approx(5 / 6)
    score = dense(stats.score())
    assert score[0, 1] == pytest.approx(2 - 9 / 5)
    assert score[0, 2] == pytest.approx(2 - 6 / 5)
    assert score[1, 3] == pytest.approx(1 - 6 / 5)


def test_complements_need_support_and_a_lift_above_one():
    stats = co_purchase(BASKETS)
    items = np.arange(4)

    # 0: 2 (score 0.8) before 1 (0.2); 1: only 0 (2 and 3 have lift 5/6); 3: none
    assert complements(stats, items, 3, min_support=1).tolist() == [[2, 1, -1], [0, -1, -1], [0, -1, -1], [-1, -1, -1]]
    assert complements(stats, np.array([1, 0]), 1, min_support=1).tolist() == [[0], [2]]
    with_support_2 = complements(stats, items, 3, min_support=2)
    assert with_support_2.tolist() == [[2, 1, -1], [0, -1, -1], [0, -1, -1], [-1, -1, -1]]
    assert complements(stats, items, 3, min_support=3).tolist() == [[-1] * 3] * 4
    assert complements(stats, items, 3, min_support=1, blocked_items=np.array([2])).tolist()[0] == [1, -1, -1]


def test_the_score_prefers_support_over_a_rare_high_lift():
    # of 100 baskets, 0 and 1 share 40 (lift 1.11, 4 beyond chance); 0 and 2 share one, 2's only
    # basket (lift 1.67, 0.4 beyond chance); item 3 alone fills the rest
    rows = [[1, 1, 0, 0]] * 40 + [[1, 0, 1, 0]] + [[1, 0, 0, 0]] * 19 + [[0, 1, 0, 0]] * 20 + [[0, 0, 0, 1]] * 20
    stats = co_purchase(sp.csr_matrix(np.array(rows, dtype=np.float32)))

    assert dense(stats.lift())[0, 2] > dense(stats.lift())[0, 1]
    assert complements(stats, np.array([0]), 2, min_support=1).tolist() == [[1, 2]]


def test_top_per_row_breaks_ties_by_lower_index():
    scores = sp.csr_matrix(np.array([[0, 2, 2, 1], [0, 0, 0, 0], [5, 0, 0, 0]], dtype=np.float32))

    assert top_per_row(scores, 2).tolist() == [[1, 2], [-1, -1], [0, -1]]


def test_sparse_items_are_filled_from_similar_items_without_repeats():
    primary = np.array([[2, 1, -1], [-1, -1, -1], [4, -1, -1]])
    similar = np.array([[1, 3, 5], [0, 2, 3], [-1, -1, -1]])

    assert fill_from(primary, similar).tolist() == [[2, 1, 3], [0, 2, 3], [4, -1, -1]]


def test_bought_together_gives_every_item_a_list():
    similar = np.array([[3, 1, 2], [2, 3, 0], [3, 1, 0], [2, 0, 1]])

    lists = bought_together(BASKETS, np.arange(4), similar, n=2, min_support=1)

    assert lists.tolist() == [[2, 1], [0, 2], [0, 3], [2, 0]]


def test_a_cart_merges_lists_by_reciprocal_rank_votes():
    lists = [[10, 11, 12], [12, 13], [14]]

    # 10: 1, 12: 1/3 + 1, 14: 1, 11: 1/2, 13: 1/2
    assert merge_ranked_lists(lists, 5) == [12, 10, 14, 11, 13]
    assert merge_ranked_lists(lists, 2, excluded={12}) == [10, 14]
    assert merge_ranked_lists([], 3) == []


def test_a_cart_list_takes_each_source_in_turn():
    sources = [("bought_together", [[10, 11], [11]]), ("similar", [[12, 10, 13]]), ("never", [[14]])]

    assert rank_cart(sources, 3, cart={13}) == ([11, 10, 12], ["bought_together", "similar"])
    assert rank_cart(sources, 2, cart=set()) == ([11, 10], ["bought_together"])
    assert rank_cart([("bought_together", [])], 2, cart=set()) == ([], [])


def test_sources_vote_together_with_their_weights_and_name_their_share():
    voters = [("bought_together", 2.0, [[10, 11]]), ("similar", 1.0, [[11, 12], [12]])]

    # 10: 2, 11: 2/2 + 1 = 2 (bought_together 1, similar 1: the earlier source leads), 12: 1/2 + 1
    assert vote_ranked_lists(voters, 3) == ([10, 11, 12], ["bought_together", "similar"])
    # 12 alone: only similar voted for it
    assert vote_ranked_lists(voters, 1, excluded={10, 11}) == ([12], ["similar"])
    assert vote_ranked_lists([], 3) == ([], [])


def vote_as_defined(voters, n, excluded):
    """vote_ranked_lists as its docstring defines it, entry by entry."""
    votes, shares = {}, {}
    for name, weight, lists in voters:
        for ranked in lists:
            for position, entry in enumerate(ranked, start=1):
                if entry not in excluded:
                    votes[entry] = votes.get(entry, 0.0) + weight / position
                    share = shares.setdefault(entry, {})
                    share[name] = share.get(name, 0.0) + weight / position
    picked = sorted(votes, key=votes.__getitem__, reverse=True)[:n]
    used = []
    for entry in picked:
        for name in sorted(shares[entry], key=shares[entry].__getitem__, reverse=True):
            if name not in used:
                used.append(name)
    return picked, used


def test_the_vote_matches_its_definition_on_random_lists():
    """The vote is an API hot path, written for speed: it must give what its definition gives,
    ties, repeats within a list, weights and exclusions included."""
    rng = random.Random(20)
    for _ in range(3000):
        universe = rng.randint(1, 30)

        def lists(universe: int = universe) -> list[list[int]]:
            return [[rng.randrange(universe) for _ in range(rng.randint(0, 12))] for _ in range(rng.randint(0, 4))]

        voters = [("bought_together", rng.choice([0.25, 0.5, 1.0, 2.0]), lists()), ("similar", 1.0, lists())]
        excluded = {rng.randrange(universe) for _ in range(rng.randint(0, 3))}
        n = rng.randint(0, 15)
        assert vote_ranked_lists(voters, n, excluded) == vote_as_defined(voters, n, excluded)


def test_a_blended_cart_merges_both_sources_in_one_vote_then_fills_in_turn():
    together = [[10, 11], [11]]  # 10: 1, 11: 1/2 + 1
    similar = [[12, 10, 13]]  # 12: 1, 10: 1/2, 13: 1/3

    # 10 and 11 tie at 1.5 (10 first seen), then 12: the first product's largest vote is bought_together's
    assert blend_cart(together, similar, 3, cart={13}) == ([10, 11, 12], ["bought_together", "similar"])
    # the similar source leads when bought together counts less
    assert blend_cart(together, similar, 2, cart=set(), weight=0.25) == ([12, 10], ["similar", "bought_together"])
    # what the vote leaves of n comes from the later sources, in turn; never a cart product, never twice
    assert blend_cart([[10]], [], 3, cart={20}, then=[("popularity", [[20, 10, 21, 22]])]) == (
        [10, 21, 22], ["bought_together", "popularity"],
    )
    assert blend_cart([], [], 2, cart=set()) == ([], [])
