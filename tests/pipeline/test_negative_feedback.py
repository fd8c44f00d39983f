"""Negative feedback (dislike, return, not_interested) in the pipeline: valid in the extract, read
over the whole history, excluded for good, and counting not at all in training."""

from __future__ import annotations

import json
from datetime import timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from helpers import days_before, insert_interactions, live, published_entries
from test_matrix import CATALOGUE, END, ID_TYPES, WINDOW, build, dense, write_inputs

from recsys.core.errors import InputError
from recsys.core.params import PipelineParams
from recsys.core.window import Window, window_ending
from recsys.pipeline.extract import extract
from recsys.pipeline.matrix import build_matrix, load_ids
from recsys.pipeline.stages import run_pipeline


def test_negative_event_types_may_not_be_weighted_too():
    with pytest.raises(InputError, match="negative_event_types and event_weights must not share an event type, both name: view"):
        PipelineParams(negative_event_types=("dislike", "view"))
    params = PipelineParams.from_dict({"negative_event_types": ["thumbs_down"]})
    assert params.negative_event_types == ("thumbs_down",)
    assert params.to_dict()["negative_event_types"] == ["thumbs_down"]
    assert PipelineParams().negative_event_types == ("dislike", "return", "not_interested")


def test_extract_keeps_negative_feedback_and_reads_older_pairs(settings, window_end, tmp_path):
    window = Window(window_end - timedelta(days=30), window_end)
    before = window.start - timedelta(days=400)
    insert_interactions(
        settings,
        [
            ("u1", "p1", "purchase", 1, days_before(window_end, 3)),
            ("u1", "p2", "dislike", None, days_before(window_end, 2)),
            ("u1", "p3", "return", 1, days_before(window_end, 1)),
            ("u2", "p1", "not_interested", None, days_before(window_end, 1)),
            ("u2", "p4", "dislike", None, before),  # older than the window: kept for good
            ("u2", "p4", "dislike", None, before + timedelta(days=1)),  # the same pair once
            ("u3", "p5", "view", None, before),  # an old positive: not read
            ("u3", "p6", "shrug", None, days_before(window_end, 1)),  # not configured: invalid
        ],
    )
    result = extract(settings, window, tmp_path, PipelineParams())
    table = pq.read_table(result.interactions).to_pydict()
    assert sorted(table["event_type"]) == ["dislike", "not_interested", "purchase", "return"]
    report = json.loads(result.report.read_text())
    assert report["interactions"]["rows_invalid"] == 1
    assert list(report["interactions"]["dropped"]) == [
        "unknown event_type (known: add_to_cart, dislike, not_interested, purchase, rating, return, view)"
    ]
    assert pq.read_table(result.older_negatives).to_pylist() == [{"user_id": "u2", "product_id": "p4"}]
    assert report["older_negative_pairs"] == 1


def test_negative_pairs_count_not_at_all_in_training_and_are_excluded(tmp_path):
    day = END - timedelta(days=20)
    rows = [
        ("u1", "a", "purchase", 1.0, day),  # 4, then returned: no weight left for the pair
        ("u1", "a", "return", 1.0, day + timedelta(days=1)),
        ("u1", "b", "view", None, day),  # 1
        ("u2", "b", "view", None, day),  # 1, and disliked: no weight
        ("u2", "b", "dislike", None, day),
        ("u2", "a", "add_to_cart", 1.0, day),  # 2
        ("u3", "a", "not_interested", None, day),  # nothing else: not in the model
    ]
    matrix_dir = build(tmp_path, rows, CATALOGUE)
    assert load_ids(matrix_dir / "users.parquet") == ["u1", "u2"]
    assert load_ids(matrix_dir / "items.parquet") == ["a", "b"]
    assert dense(matrix_dir, "full.npz").tolist() == [[0, 1], [2, 0]]
    assert sp.load_npz(matrix_dir / "full.npz").nnz == 2  # no stored zeros for ALS to read
    # u1 returned a (its purchase excludes it anyway); u2 disliked b
    assert dense(matrix_dir, "exclude.npz").tolist() == [[1, 0], [0, 1]]
    manifest = json.loads((matrix_dir / "manifest.json").read_text())
    assert manifest["counts"]["negative_pairs"] == 2
    assert manifest["counts"]["users_without_weight"] == 1
    items = pq.read_table(matrix_dir / "items.parquet").to_pydict()
    assert items["buyers"] == [0, 0]  # a returned purchase makes no buyer


def test_holdout_split_excludes_negatives_and_a_returned_purchase_is_no_hit(tmp_path):
    early, late = END - timedelta(days=20), END - timedelta(days=2)  # holdout_days=7
    rows = [
        ("u1", "a", "view", None, early),
        ("u1", "b", "dislike", None, early),  # before the cutoff: excluded when evaluating
        ("u1", "c", "purchase", 1.0, late),  # bought after the cutoff, then returned: no hit
        ("u1", "c", "return", None, late),
        ("u2", "a", "purchase", 1.0, early),  # before the cutoff; returned after it
        ("u2", "a", "return", None, late),
        ("u2", "b", "purchase", 1.0, late),  # a hit
    ]
    matrix_dir = build(tmp_path, rows, CATALOGUE)
    assert dense(matrix_dir, "train.npz").tolist() == [[1, 0, 0], [4, 0, 0]]  # the return came later
    assert dense(matrix_dir, "full.npz").tolist() == [[1, 0, 0], [0, 4, 0]]
    assert dense(matrix_dir, "train_exclude.npz").tolist() == [[0, 1, 0], [1, 0, 0]]
    assert dense(matrix_dir, "holdout.npz").tolist() == [[0, 0, 0], [0, 1, 0]]


def test_older_negative_pairs_join_the_exclusions(tmp_path):
    day = END - timedelta(days=20)
    rows = [("u1", "a", "view", None, day), ("u2", "b", "view", None, day)]
    interactions, products = write_inputs(tmp_path, rows, CATALOGUE)
    older = tmp_path / "older_negatives.parquet"
    pq.write_table(pa.Table.from_pylist([{"user_id": "u1", "product_id": "b"}, {"user_id": "u9", "product_id": "a"}]), older)
    params = PipelineParams(confidence_scaling="none")
    matrix_dir = build_matrix(interactions, products, WINDOW, tmp_path / "matrix", params, ID_TYPES, older).matrix_dir
    # u9 is not in the window: nothing to mark; u1's old dislike of b stays excluded
    assert dense(matrix_dir, "exclude.npz").tolist() == [[0, 1], [0, 0]]
    assert dense(matrix_dir, "train_exclude.npz").tolist() == [[0, 1], [0, 0]]
    assert json.loads((matrix_dir / "manifest.json").read_text())["counts"]["older_negative_pairs"] == 1


def test_publish_never_lists_a_product_the_user_gave_negative_feedback_on(settings, demo_loaded, window_end):
    params = PipelineParams(top_n=10)
    window = window_ending(window_end, params)
    # the products each user would get first, without negative feedback
    first = run_pipeline(settings, window_end - timedelta(days=1), params).publish
    assert first is not None
    lists = {int(u): entry["recommended_products"] for u, entry in published_entries(settings).items()}
    users = sorted(lists)[:40]
    # half of them say no inside the next window, half long before it (left the window since)
    rows = []
    for position, user in enumerate(users):
        at = days_before(window_end, 0.5) if position % 2 else window.start - timedelta(days=500)
        kind = ("dislike", "not_interested", "return")[position % 3]
        rows += [(str(user), str(product), kind, None, at) for product in lists[user][:3]]
    insert_interactions(settings, rows)
    result = run_pipeline(settings, window_end, params)
    assert result.publish is not None and result.publish.version != first.version
    for position, user in enumerate(users):
        entry = live(settings).user_recommendations(str(user))
        shown = set(entry["recommended_products"]) if entry else set()
        assert not shown & set(lists[user][:3]), (position, user)
