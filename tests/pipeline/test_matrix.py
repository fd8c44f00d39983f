"""Matrix building on hand-made Parquet: weights, decay, id maps, holdout split."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from recsys.core.ids import IdTypes
from recsys.core.params import PipelineParams
from recsys.core.window import Window
from recsys.pipeline.extract import INTERACTIONS_SCHEMA
from recsys.pipeline.matrix import build_matrix, load_ids

END = datetime(2026, 11, 28, 3, tzinfo=UTC)
WINDOW = Window(END - timedelta(days=30), END)

ID_TYPES = IdTypes("str", "str", {})  # the matrix only records them


def write_inputs(tmp_path, rows, products):
    tmp_path.mkdir(parents=True, exist_ok=True)
    interactions = tmp_path / "interactions.parquet"
    columns = list(zip(*rows, strict=True))
    pq.write_table(
        pa.table(
            {
                "user_id": list(columns[0]),
                "product_id": list(columns[1]),
                "event_type": list(columns[2]),
                "value": list(columns[3]),
                "occurred_at": list(columns[4]),
            },
            schema=INTERACTIONS_SCHEMA,
        ),
        interactions,
    )
    products_path = tmp_path / "products.parquet"
    product_columns = list(zip(*products, strict=True))
    pq.write_table(
        pa.table(
            {
                "product_id": pa.array(product_columns[0], pa.string()),
                "name": pa.array(product_columns[1], pa.string()),
                "category": pa.array(product_columns[2], pa.string()),
                "active": pa.array(product_columns[3], pa.bool_()),
            }
        ),
        products_path,
    )
    return interactions, products_path


def build(tmp_path, rows, products, **params):
    interactions, products_path = write_inputs(tmp_path, rows, products)
    params = {"confidence_scaling": "none", **params}  # raw weights unless a test asks for scaling
    result = build_matrix(interactions, products_path, WINDOW, tmp_path / "matrix", PipelineParams(**params), ID_TYPES)
    return result.matrix_dir


def dense(matrix_dir, name):
    return sp.load_npz(matrix_dir / name).toarray()


CATALOGUE = [("a", "A", "x", True), ("b", "B", "x", True), ("c", "C", "y", False)]


def test_weights_sum_by_event_type_and_value(tmp_path):
    day = END - timedelta(days=20)
    rows = [
        ("u2", "a", "purchase", 2.0, day),  # 4 * 2
        ("u2", "a", "view", None, day),  # + 1 * 1 (NULL value counts as 1)
        ("u1", "b", "add_to_cart", 1.0, day),  # 2 * 1
        ("u1", "c", "rating", 5.0, day),  # 1 * 5
    ]
    matrix_dir = build(tmp_path, rows, CATALOGUE)
    assert load_ids(matrix_dir / "users.parquet") == ["u1", "u2"]  # sorted: stable maps
    assert load_ids(matrix_dir / "items.parquet") == ["a", "b", "c"]
    np.testing.assert_allclose(dense(matrix_dir, "full.npz"), [[0, 2, 5], [9, 0, 0]])
    # purchases and ratings are never recommended again; carts and views may be
    np.testing.assert_array_equal(dense(matrix_dir, "exclude.npz"), [[0, 0, 1], [1, 0, 0]])


def test_same_data_gives_identical_matrices(tmp_path):
    rows = [(f"u{i % 5}", "abc"[i % 3], "view", None, END - timedelta(days=i % 9 + 1)) for i in range(40)]
    first = build(tmp_path / "1", rows, CATALOGUE)
    second = build(tmp_path / "2", list(reversed(rows)), CATALOGUE)
    for name in ("full.npz", "train.npz", "holdout.npz", "exclude.npz"):
        np.testing.assert_array_equal(dense(first, name), dense(second, name))


def test_time_decay_halves_weight_per_half_life(tmp_path):
    rows = [("u1", "a", "view", None, END - timedelta(days=10)), ("u1", "b", "view", None, END - timedelta(days=20))]
    matrix_dir = build(tmp_path, rows, CATALOGUE, half_life_days=10)
    np.testing.assert_allclose(dense(matrix_dir, "full.npz")[0, :2], [0.5, 0.25], rtol=1e-6)


def test_holdout_split_at_cutoff(tmp_path):
    before, after = END - timedelta(days=10), END - timedelta(days=3)
    rows = [
        ("u1", "a", "purchase", 1.0, before),
        ("u1", "a", "purchase", 1.0, after),  # bought again: not a discovery, not relevant
        ("u1", "b", "purchase", 1.0, after),  # relevant
        ("u1", "c", "view", None, after),  # a view is not relevant by default
        ("u2", "b", "view", None, before),
    ]
    matrix_dir = build(tmp_path, rows, CATALOGUE, holdout_days=7)
    manifest = json.loads((matrix_dir / "manifest.json").read_text())
    assert manifest["holdout_cutoff"] == (END - timedelta(days=7)).isoformat()
    np.testing.assert_allclose(dense(matrix_dir, "train.npz"), [[4, 0, 0], [0, 1, 0]])
    np.testing.assert_array_equal(dense(matrix_dir, "holdout.npz"), [[0, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(dense(matrix_dir, "train_exclude.npz"), [[1, 0, 0], [0, 0, 0]])
    assert manifest["counts"]["holdout_users"] == 1


def test_products_missing_from_catalogue_are_inactive(tmp_path):
    rows = [("u1", "a", "purchase", 1.0, END - timedelta(days=9)), ("u1", "zzz", "purchase", 1.0, END - timedelta(days=9))]
    matrix_dir = build(tmp_path, rows, CATALOGUE)
    items = pq.read_table(matrix_dir / "items.parquet").to_pydict()
    assert items["id"] == ["a", "zzz"]
    assert items["active"] == [True, False]
    assert items["buyers"] == [1, 1]
    manifest = json.loads((matrix_dir / "manifest.json").read_text())
    assert manifest["counts"]["items_missing_from_catalogue"] == 1


@pytest.mark.parametrize("scheme", ["log", "bm25"])
def test_confidence_scaling_keeps_the_pattern(tmp_path, scheme):
    rows = [("u1", "a", "purchase", 3.0, END - timedelta(days=9))]
    rows += [(f"v{i}", "b", "view", None, END - timedelta(days=9)) for i in range(5)]
    plain = dense(build(tmp_path / "plain", rows, CATALOGUE), "full.npz")
    scaled = dense(build(tmp_path / scheme, rows, CATALOGUE, confidence_scaling=scheme), "full.npz")
    np.testing.assert_array_equal(plain > 0, scaled > 0)
    assert scaled[0, 0] < plain[0, 0]


def test_batched_reading_builds_the_same_matrices(tmp_path, monkeypatch):
    """Rows are read in batches; batch boundaries must not change any output."""
    from recsys.pipeline import matrix

    rng = np.random.default_rng(3)
    types = ["purchase", "view", "add_to_cart", "rating", "wishlist"]  # "wishlist": unknown, weight 0
    rows = [
        (f"u{rng.integers(30)}", "abc"[rng.integers(3)], types[rng.integers(len(types))],
         float(rng.integers(1, 4)), END - timedelta(days=float(rng.uniform(0.5, 29))))
        for _ in range(500)
    ]
    whole = build(tmp_path / "whole", rows, CATALOGUE)
    monkeypatch.setattr(matrix, "BATCH_ROWS", 37)
    batched = build(tmp_path / "batched", rows, CATALOGUE)
    for name in ("full.npz", "train.npz", "exclude.npz", "train_exclude.npz", "holdout.npz"):
        np.testing.assert_array_equal(dense(whole, name), dense(batched, name), err_msg=name)
        assert dense(whole, name).any(), name
    for name in ("users.parquet", "items.parquet"):
        assert pq.read_table(whole / name).equals(pq.read_table(batched / name)), name


def test_a_returned_purchase_is_in_no_basket(tmp_path):
    day, next_day = END - timedelta(days=5), END - timedelta(days=4)
    rows = [
        ("u1", "a", "purchase", 1.0, day), ("u1", "b", "purchase", 1.0, day), ("u1", "b", "return", None, next_day),
        ("u2", "a", "purchase", 1.0, day), ("u2", "b", "purchase", 1.0, day),
    ]
    baskets = dense(build(tmp_path, rows, CATALOGUE), "baskets.npz")
    # u2's basket holds both; u1 returned b, so u1's basket holds a alone
    assert sorted(map(tuple, baskets.tolist())) == [(1, 0), (1, 1)]  # items a, b
