"""Model families (recsys.ml.families) against plain references: dense float64 scores and a full
sort; save/load round trips; and selection (recsys.ml.selection) picking the validation winner."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

from recsys.core.errors import InputError
from recsys.ml import families, selection
from recsys.ml.autoencoder import MultDae
from recsys.ml.families import Als, Blend, Bpr, Ease, ItemKnn, load_model


def clustered(users: int = 120, items: int = 80, seed: int = 0, noise: float = 0.05) -> sp.csr_matrix:
    """Four taste clusters of items; each user takes a third of one cluster, plus a little noise."""
    rng = np.random.default_rng(seed)
    rows, cols = [], []
    cluster_size = items // 4
    for user in range(users):
        cluster = user % 4
        liked = rng.choice(np.arange(cluster * cluster_size, (cluster + 1) * cluster_size), cluster_size // 3,
                           replace=False)
        others = rng.choice(items, max(1, int(noise * items)), replace=False)
        chosen = np.union1d(liked, others)
        rows += [user] * len(chosen)
        cols += chosen.tolist()
    values = rng.integers(1, 6, size=len(rows)).astype(np.float32)
    return sp.csr_matrix((np.log1p(values), (rows, cols)), shape=(users, items), dtype=np.float32)


MODELS = {
    "als": lambda: Als(factors=8, regularization=1.0, iterations=10),
    "bpr": lambda: Bpr(factors=8, iterations=30),
    "item_knn": lambda: ItemKnn(neighbours=20),
    "item_knn_cosine": lambda: ItemKnn(similarity="cosine", neighbours=20, binary=True),
    "ease": lambda: Ease(regularization=10.0),
    "mult_dae": lambda: MultDae(latent=8, epochs=40, batch_size=32, learning_rate=0.01),
    "mult_dae_binary": lambda: MultDae(latent=8, epochs=40, batch_size=32, learning_rate=0.01, binary=True),
    "blend": lambda: Blend([Als(factors=8, regularization=1.0, iterations=10), Ease(regularization=10.0)], 0.7),
}


@pytest.fixture(scope="module")
def matrix() -> sp.csr_matrix:
    return clustered()


@pytest.fixture(scope="module", params=sorted(MODELS))
def fitted(request, matrix):
    return request.param, MODELS[request.param]().fit(matrix, seed=3)


def dense_scores(model, matrix: sp.csr_matrix) -> np.ndarray:
    """What each family's docstring says its score is, in float64 from its own arrays."""
    if isinstance(model, Als | Bpr):
        return model.user_factors.astype(np.float64) @ model.item_factors.T.astype(np.float64)
    if isinstance(model, MultDae):  # logits of tanh(unit row · encoder + bias) · decoder + bias
        rows = matrix.toarray().astype(np.float64)
        if model.binary:
            rows = (rows > 0).astype(np.float64)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        hidden = np.tanh(rows @ model.encoder.astype(np.float64) + model.encoder_bias)
        return hidden @ model.decoder.astype(np.float64) + model.decoder_bias
    if isinstance(model, Blend):
        total = 0
        for part, weight in zip(model.parts, (model.weight, 1 - model.weight), strict=True):
            scores = dense_scores(part, matrix)
            total = total + weight * (scores - scores.mean(axis=1, keepdims=True)) / scores.std(axis=1, keepdims=True)
        return total
    rows = matrix.toarray().astype(np.float64)
    if model.binary:
        rows = (rows > 0).astype(np.float64)
    return rows @ model.matrix.astype(np.float64)


def test_lists_are_the_best_scored_allowed_items(fitted, matrix):
    name, model = fitted
    blocked = np.zeros(matrix.shape[1], dtype=bool)
    blocked[[3, 30, 50]] = True
    users = np.arange(matrix.shape[0])

    lists = model.recommend(users, matrix, 10, exclude=matrix, blocked=blocked)

    scores = dense_scores(model, matrix)
    scores[matrix.nonzero()] = -np.inf
    scores[:, blocked] = -np.inf
    for user in users:
        assert not set(lists[user]) & set(matrix[user].indices) and not blocked[lists[user]].any()
        expected = np.sort(scores[user])[::-1][:10]
        # the same scores (ties may order differently between float32 selection and the float64 reference)
        np.testing.assert_allclose(np.sort(scores[user, lists[user]])[::-1], expected, rtol=1e-4, atol=1e-5)


def test_save_and_load_give_the_same_model(fitted, matrix, tmp_path):
    name, model = fitted
    path = tmp_path / f"{name}.npz"
    model.save(path)

    loaded = load_model(path)

    assert type(loaded) is type(model) and families.describe(loaded) == families.describe(model)
    users = np.arange(matrix.shape[0])
    np.testing.assert_array_equal(loaded.recommend(users, matrix, 10, exclude=matrix),
                                  model.recommend(users, matrix, 10, exclude=matrix))
    np.testing.assert_array_equal(loaded.similar_items(np.arange(10), 5), model.similar_items(np.arange(10), 5))
    with np.load(path, allow_pickle=False) as saved:  # plain arrays and a JSON string: nothing pickled
        assert all(saved[key].dtype != object for key in saved.files)
    # publish's similar products load the items alone: the same lists, no user factors read
    items_only = load_model(path, with_users=False)
    np.testing.assert_array_equal(items_only.similar_items(np.arange(10), 5), model.similar_items(np.arange(10), 5))
    assert all(getattr(part, "user_factors", None) is None for part in (items_only, *getattr(items_only, "parts", ())))


def test_user_factors_on_disk_read_the_rows_the_array_holds(fitted, matrix, tmp_path, monkeypatch):
    # publish reads a factor model's users from the file a chunk at a time (StoredRows)
    name, model = fitted
    path = tmp_path / f"{name}.npz"
    model.save(path)
    monkeypatch.setattr(families, "STORED_ROWS_BLOCK", 7)  # index arrays over several mappings
    on_disk = load_model(path, users_on_disk=True)
    users = np.arange(matrix.shape[0])
    np.testing.assert_array_equal(on_disk.user_vectors(users[::3], matrix), model.user_vectors(users[::3], matrix))
    parts = {"": on_disk, **{f"part{index}/": part for index, part in enumerate(getattr(on_disk, "parts", ()))}}
    with np.load(path) as saved:
        held_arrays = {name: saved[name] for name in saved.files if name.endswith("user_factors")}
    for name, held in held_arrays.items():
        stored = parts[name.removesuffix("user_factors")].user_factors
        assert isinstance(stored, families.StoredRows) and len(stored) == len(held)
        np.testing.assert_array_equal(stored[5:17], held[5:17])
        np.testing.assert_array_equal(stored[len(held) - 3 : len(held) + 10], held[len(held) - 3 :])
        np.testing.assert_array_equal(stored[np.array([9, 2, 2, len(held) - 1])], held[[9, 2, 2, len(held) - 1]])
        assert stored[np.array([], np.int64)].shape == (0, held.shape[1])
    np.testing.assert_array_equal(on_disk.recommend(users, matrix, 10, exclude=matrix),
                                  model.recommend(users, matrix, 10, exclude=matrix))


def test_compressed_user_factors_are_refused_on_disk(matrix, tmp_path):
    model = Als(factors=4, iterations=3).fit(matrix)
    np.savez_compressed(tmp_path / "factors.npz", user_factors=model.user_factors, item_factors=model.item_factors)
    with pytest.raises(InputError, match="compressed"):
        load_model(tmp_path / "factors.npz", users_on_disk=True)


def test_fitting_twice_gives_identical_arrays(fitted, matrix):
    name, model = fitted
    again = MODELS[name]().fit(matrix, seed=3)
    np.testing.assert_array_equal(again.items.factors, model.items.factors)


def test_similar_items_never_list_the_item_itself_and_follow_the_family(fitted, matrix):
    name, model = fitted
    similar = model.similar_items(np.arange(matrix.shape[1]), 5)
    assert (similar != np.arange(matrix.shape[1])[:, None]).all()
    if isinstance(model, Ease | ItemKnn):  # the list of a user who has only that item
        for item in (0, 21, 44):
            row = model.matrix[item].astype(np.float64)
            row[item] = -np.inf
            np.testing.assert_allclose(np.sort(row[similar[item]])[::-1], np.sort(row)[::-1][:5], rtol=1e-5)
    # items of one cluster are most alike: most neighbours come from the query's cluster (chance: 1 in 4)
    if name in ("als", "ease", "item_knn", "mult_dae", "mult_dae_binary", "blend"):
        assert ((similar // 20) == (np.arange(matrix.shape[1]) // 20)[:, None]).mean() > 0.6


def test_fold_in_scores_a_new_row_as_a_fitted_one(fitted, matrix):
    name, model = fitted
    row = matrix[[7]]
    vector = model.fold_in(row)
    if isinstance(model, Bpr):
        assert vector is None  # no closed-form user solve: the API falls back (docs/quality.md)
        return
    fitted_vector = model.user_vectors(np.array([7]), matrix)[0]
    if isinstance(model, Als | Blend):  # a least-squares solve against fixed items: close, not equal
        assert np.corrcoef(vector, fitted_vector)[0, 1] > 0.95
    else:
        np.testing.assert_array_equal(vector, fitted_vector)


@pytest.mark.parametrize("similarity", ["bm25", "cosine"])
def test_item_knn_is_implicits_recommender_without_its_conversion_warning(matrix, similarity):
    from implicit.nearest_neighbours import BM25Recommender, CosineRecommender

    reference = (BM25Recommender(K=20, num_threads=1) if similarity == "bm25"
                 else CosineRecommender(K=20, num_threads=1))
    with pytest.warns(Warning):  # implicit's own fit passes COO on and warns about it
        reference.fit(matrix, show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = ItemKnn(similarity=similarity, neighbours=20).fit(matrix)

    np.testing.assert_array_equal(ours.matrix, reference.similarity.toarray().astype(np.float32))


def test_bare_factor_files_load_as_als(tmp_path, matrix):
    model = Als(factors=4, iterations=3).fit(matrix)
    # the file train wrote before families: the two factor arrays alone
    np.savez(tmp_path / "factors.npz", user_factors=model.user_factors, item_factors=model.item_factors)
    loaded = load_model(tmp_path / "factors.npz")
    assert isinstance(loaded, Als)
    np.testing.assert_array_equal(loaded.item_factors, model.item_factors)


def test_item_item_families_refuse_a_catalogue_over_their_limit(matrix, monkeypatch):
    monkeypatch.setattr(families, "DENSE_ITEMS_LIMIT", matrix.shape[1] - 1)
    for model in (Ease(), ItemKnn()):
        with pytest.raises(InputError, match=rf"{matrix.shape[1]} items is over its limit of {matrix.shape[1] - 1}") as refused:
            model.fit(matrix)
        assert "\n" not in str(refused.value)


def test_mult_dae_refuses_a_shop_over_its_dense_limit(matrix, monkeypatch):
    from recsys.ml import autoencoder

    users, items = matrix.shape
    monkeypatch.setattr(autoencoder, "DENSE_CELLS_LIMIT", users * items - 1)
    with pytest.raises(InputError, match=rf"{users:,} x {items:,} is over its limit of {users * items - 1:,} cells") as refused:
        MultDae().fit(matrix)
    assert "\n" not in str(refused.value)
    monkeypatch.setattr(autoencoder, "DENSE_CELLS_LIMIT", users * items)
    assert MultDae(epochs=1).fit(matrix).decoder.shape == (MultDae().latent, items)


def holdout(matrix: sp.csr_matrix, seed: int) -> selection.ValidationSplit:
    """A quarter of every user's items held out."""
    rng = np.random.default_rng(seed)
    coo = matrix.tocoo()
    held = rng.random(coo.nnz) < 0.25
    fit = sp.csr_matrix((coo.data[~held], (coo.row[~held], coo.col[~held])), shape=matrix.shape)
    relevant = sp.csr_matrix((np.ones(held.sum(), np.float32), (coo.row[held], coo.col[held])), shape=matrix.shape)
    return selection.ValidationSplit(fit, relevant)


GRIDS = {
    # one factor and a huge penalty: ALS can only rank by popularity, blind to the clusters
    "als": [{"factors": 1, "regularization": 1e4, "iterations": 5}],
    "ease": [{"regularization": 1.0}, {"regularization": 10.0}],
    "item_knn": [{"neighbours": 20}],
    "bpr": [{"factors": 8, "iterations": 20}],
}


def test_selection_picks_the_family_that_wins_on_validation(matrix):
    splits = [holdout(matrix, 0), holdout(matrix, 1)]

    chosen = selection.select(splits, ("als", "ease", "item_knn", "blend"), seed=3, grids=GRIDS)

    scores = {name: candidate.validation["ndcg"] for name, candidate in chosen.best.items()}
    assert set(scores) == {"als", "ease", "item_knn", "blend"}
    assert chosen.chosen.validation["ndcg"] == max(scores.values())
    assert scores["als"] < 0.6 * min(scores["ease"], scores["item_knn"])  # the clusters matter
    assert chosen.chosen.family in ("ease", "item_knn", "blend")
    # every tried setting is scored, and the best per family is the best of its tries
    for name in ("als", "ease", "item_knn"):
        tries = [c.validation["ndcg"] for c in chosen.tried if c.family == name]
        assert len(tries) == len(GRIDS[name]) and scores[name] == max(tries)
    again = selection.select(splits, ("als", "ease", "item_knn", "blend"), seed=3, grids=GRIDS)
    assert [(c.family, c.params, c.validation) for c in again.tried] == [(c.family, c.params, c.validation) for c in chosen.tried]


def test_selection_skips_a_family_that_refuses_the_data_and_says_why(matrix, monkeypatch):
    monkeypatch.setattr(families, "DENSE_ITEMS_LIMIT", 10)

    chosen = selection.select([holdout(matrix, 0)], ("als", "ease", "blend"), seed=3, grids=GRIDS)

    assert chosen.chosen.family == "als" and set(chosen.best) == {"als"}
    assert "over its limit of 10" in chosen.skipped["ease"]


def test_selection_refuses_unknown_families(matrix):
    with pytest.raises(InputError, match="unknown model families: svd"):
        selection.select([holdout(matrix, 0)], ("als", "svd"))


def test_a_users_vector_is_the_same_alone_and_in_a_batch(fitted, matrix):
    """Publish ranks users in batches, the API one at a time: the same vector, so the same list."""
    name, model = fitted
    batch = model.user_vectors(np.arange(matrix.shape[0]), matrix)
    for user in (0, 7, 119):
        np.testing.assert_array_equal(model.user_vectors(np.array([user]), matrix)[0], batch[user])


@pytest.mark.parametrize("binary", [False, True])
def test_mult_dae_gradients_match_finite_differences(matrix, binary):
    """The hand-written backward pass against central differences of the loss, in float64."""
    model = MultDae(latent=4, epochs=1, batch_size=200, keep=1.0, l2=0.1, binary=binary).fit(matrix[:30], seed=1)
    parameters = [model.encoder, model.decoder, model.encoder_bias, model.decoder_bias]
    parameters = [p.astype(np.float64) for p in parameters]
    model.encoder, model.decoder, model.encoder_bias, model.decoder_bias = parameters
    rows = matrix[:30]
    targets = (rows.toarray() > 0).astype(np.float64) if binary else rows.toarray().astype(np.float64)
    inputs = targets / np.linalg.norm(targets, axis=1, keepdims=True)
    gradients = model._gradients(inputs, targets, *parameters)
    rng = np.random.default_rng(0)
    for parameter, gradient in zip(parameters, gradients, strict=True):
        for index in map(tuple, rng.integers(0, parameter.shape, size=(5, parameter.ndim))):
            saved = parameter[index]
            parameter[index] = saved + 1e-6
            above = model.loss(rows)
            parameter[index] = saved - 1e-6
            below = model.loss(rows)
            parameter[index] = saved
            assert gradient[index] == pytest.approx((above - below) / 2e-6, rel=1e-4, abs=1e-8)


def test_mult_dae_training_lowers_its_loss_and_learns_the_clusters(matrix):
    untrained = MultDae(latent=8, epochs=0).fit(matrix, seed=3)
    trained = MODELS["mult_dae"]().fit(matrix, seed=3)
    assert trained.loss(matrix) < 0.9 * untrained.loss(matrix)
    lists = trained.recommend(np.arange(matrix.shape[0]), matrix, 5, exclude=matrix)
    own_cluster = (lists // 20) == (np.arange(matrix.shape[0]) % 4)[:, None]
    assert own_cluster.mean() > 0.8  # chance: 1 in 4


def test_mult_dae_fits_differ_by_seed_only(matrix):
    one, other = MODELS["mult_dae"]().fit(matrix, seed=3), MODELS["mult_dae"]().fit(matrix, seed=4)
    assert not np.array_equal(one.encoder, other.encoder)
