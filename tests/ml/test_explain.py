"""explain_items against implicit's own AlternatingLeastSquares.explain, on small synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from recsys.ml.als import fit_als
from recsys.ml.explain import explain_items
from recsys.ml.ranking import als_model


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(3)
    matrix = sp.random(40, 30, density=0.2, format="csr", random_state=4, dtype=np.float32)
    matrix.data = rng.uniform(0.5, 3.0, size=matrix.nnz).astype(np.float32)
    user_factors, item_factors = fit_als(matrix, factors=6, regularization=2.0, alpha=3.0, iterations=10, seed=1)
    model = als_model(user_factors, item_factors)
    model.regularization, model.alpha = 2.0, 3.0
    return model, matrix


@pytest.mark.parametrize("user", [0, 7, 19])
def test_contributions_agree_with_implicits_explain(fitted, user):
    model, matrix = fitted
    items = [2, 11, 29]
    ours = explain_items(model.item_factors, matrix[user], items, regularization=2.0, alpha=3.0, n=4)

    for explanation, item in zip(ours, items, strict=True):
        total, top, _ = model.explain(user, matrix, item, N=4)
        assert explanation.item == item
        assert explanation.score == pytest.approx(total, rel=1e-4, abs=1e-6)
        assert [past for past, _ in explanation.contributions] == [past for past, _ in top]
        assert [c for _, c in explanation.contributions] == pytest.approx([c for _, c in top], rel=1e-4, abs=1e-6)


def test_the_contributions_add_up_to_the_folded_in_users_score(fitted):
    """The score explained is the one of the user vector solved from the row (implicit's
    recalculate_user), the vector a fold-in ranks with."""
    model, matrix = fitted
    vector = np.asarray(model.recalculate_user(0, matrix[5]), dtype=np.float64)
    explanation = explain_items(model.item_factors, matrix[5], [0, 1, 2], regularization=2.0, alpha=3.0,
                                n=matrix[5].nnz)

    for entry in explanation:
        assert entry.score == pytest.approx(float(model.item_factors[entry.item] @ vector), rel=1e-3, abs=1e-5)
        assert sum(c for _, c in entry.contributions) == pytest.approx(entry.score, rel=1e-9)


def test_an_empty_row_explains_nothing(fitted):
    model, matrix = fitted
    empty = sp.csr_matrix((1, matrix.shape[1]), dtype=np.float32)
    [explanation] = explain_items(model.item_factors, empty, [3], regularization=2.0, alpha=3.0)
    assert explanation.score == 0.0 and explanation.contributions == []
