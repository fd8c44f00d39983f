"""Content-based similarity and new-arrival slots (recsys.ml.content), without servers."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from recsys.ml.content import pick_new_arrivals, place_new_arrivals, product_tokens, similar_by_content, tfidf_rows


def test_tokens_cover_category_attributes_and_name_words():
    tokens = product_tokens("shoes", "Trail Runner X", {"colour": "red", "sizes": [41, 42], "spec": {"waterproof": True}})
    assert tokens == {
        "category=shoes", "colour=red", "sizes=41", "sizes=42", "spec.waterproof=true", "name:trail", "name:runner",
    }
    assert product_tokens(None, None, None) == set()


def test_a_shared_rare_attribute_counts_more_than_a_shared_category():
    documents = [
        product_tokens("shoes", "aa", {"brand": "acme"}),  # 0: the product asked about
        product_tokens("shoes", "bb", {}),  # 1: same category only
        product_tokens("bags", "cc", {"brand": "acme"}),  # 2: same rare brand only
        product_tokens("shoes", "dd", {}),
        product_tokens("shoes", "ee", {}),
        product_tokens("toys", "ff", {}),  # 5: nothing in common
    ]
    vectors = tfidf_rows(documents)
    assert np.allclose(sp.linalg.norm(vectors, axis=1), 1)
    lists = similar_by_content(vectors, np.array([0]), 5, np.zeros(6, dtype=bool))
    assert lists[0, 0] == 2  # the brand, rarer than the category
    assert set(lists[0, 1:4]) == {1, 3, 4} and lists[0, 4] == -1  # toys share no token: never listed


def test_similar_never_lists_itself_or_a_blocked_product_and_ties_go_by_index():
    vectors = tfidf_rows([product_tokens("c", None, None) for _ in range(6)])
    blocked = np.zeros(6, dtype=bool)
    blocked[2] = True
    lists = similar_by_content(vectors, np.array([0, 3]), 3, blocked)
    assert lists.tolist() == [[1, 3, 4], [0, 1, 4]]


def test_new_arrivals_follow_the_users_history_and_skip_blocked_and_owned():
    # one vocabulary: the items' rows, then the new products'
    both = tfidf_rows([product_tokens(c, None, None) for c in ("books", "toys", "toys", "books", "toys", "garden")])
    known, new = both[:2], both[2:]
    history = sp.csr_matrix(np.array([[3.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=np.float32))
    blocked = np.zeros(4, dtype=bool)
    owned = sp.csr_matrix(np.array([[0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=np.float32))
    picks = pick_new_arrivals(history, known, new, 2, blocked, owned)
    assert picks[0].tolist() == [1, 0]  # books first, then the lowest index of the rest
    assert picks[1].tolist() == [0, 2]  # both toys
    assert picks[2].tolist() == [2, 1]  # owned toy 0 skipped
    blocked[:] = [True, True, True, False]
    assert pick_new_arrivals(history, known, new, 2, blocked, owned).tolist() == [[3, -1]] * 3


def test_arrivals_take_the_last_free_slots_and_pins_keep_theirs():
    lists = np.array([[1, 2, 3, 4], [1, 9, 2, 3], [5, -1, -1, -1]])
    arrivals = np.array([[10, 11], [10, -1], [12, 13]])
    pinned = lists == 9
    out = place_new_arrivals(lists, arrivals, pinned)
    assert out[0].tolist() == [1, 2, 10, 11]
    assert out[1].tolist() == [1, 9, 2, 10]  # pin at rank 2 kept; one arrival: one own item more
    assert out[2].tolist() == [5, 12, 13, -1]  # a short list keeps all its items
    assert (place_new_arrivals(lists, np.full((3, 2), -1), pinned) == lists).all()
