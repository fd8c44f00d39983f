"""Extract against a real PostgreSQL: window bounds, validation, clear errors."""

from __future__ import annotations

import json
from datetime import timedelta

import pyarrow.parquet as pq
import pytest
from conftest import days_before, insert_interactions, insert_products

from recsys.errors import EmptyWindowError, NoValidDataError
from recsys.extract import Window, extract
from recsys.params import PipelineParams


def window_for(end, days=30) -> Window:
    return Window(start=end - timedelta(days=days), end=end)


def test_reads_exactly_the_half_open_window(settings, window_end, tmp_path):
    window = window_for(window_end)
    insert_interactions(
        settings,
        [
            ("u1", "p1", "view", None, window.start - timedelta(microseconds=1)),  # before
            ("u1", "p2", "view", None, window.start),  # first instant: in
            ("u2", "p3", "purchase", 2, window.end - timedelta(microseconds=1)),  # last instant: in
            ("u2", "p4", "purchase", 1, window.end),  # end is exclusive: out (backfill safety)
            ("u3", "p5", "view", None, window.end + timedelta(days=3)),  # the future: out
        ],
    )
    result = extract(settings, window, tmp_path, PipelineParams())
    table = pq.read_table(result.interactions).to_pydict()
    assert sorted(table["product_id"]) == ["p2", "p3"]
    assert result.rows_read == result.rows_kept == 2
    assert min(table["occurred_at"]) == window.start
    assert table["value"][table["product_id"].index("p3")] == 2.0


def test_string_and_integer_ids_come_back_unchanged(settings, window_end, tmp_path):
    at = days_before(window_end, 1)
    insert_interactions(settings, [("007", "SKU-1", "view", None, at), ("42", "0042", "purchase", 1, at)])
    table = pq.read_table(extract(settings, window_for(window_end), tmp_path, PipelineParams()).interactions)
    assert sorted(table["user_id"].to_pylist()) == ["007", "42"]
    assert sorted(table["product_id"].to_pylist()) == ["0042", "SKU-1"]


def test_bad_rows_are_dropped_counted_and_named(settings, window_end, tmp_path):
    at = days_before(window_end, 2)
    good = [(f"u{i}", f"p{i % 7}", "view", None, at) for i in range(60)]
    bad = [
        (None, "p1", "view", None, at),
        ("  ", "p1", "view", None, at),
        ("u1", None, "view", None, at),
        ("u1", "p1", "clicked", None, at),
        ("u1", "p1", "purchase", float("nan"), at),
        ("u1", "p1", "purchase", -3.0, at),
        ("u1", "p1", "purchase", 1e9, at),
        ("u1", "p1", "purchase", float("inf"), at),
    ]
    insert_interactions(settings, good + bad)
    result = extract(settings, window_for(window_end), tmp_path, PipelineParams())
    assert (result.rows_read, result.rows_kept) == (68, 60)

    report = json.loads(result.report.read_text())["interactions"]
    dropped = report["dropped"]
    assert dropped["null user_id"] == 1
    assert dropped["empty user_id"] == 1
    assert dropped["null product_id"] == 1
    assert dropped["NaN value"] == 1
    assert dropped["negative value"] == 1
    assert dropped["absurd value (> max_value=1000)"] == 2
    unknown = next(reason for reason in dropped if reason.startswith("unknown event_type"))
    assert report["examples"][unknown][0]["event_type"] == "clicked"
    assert report["examples"]["negative value"][0]["value"] == -3.0
    assert report["examples"]["negative value"][0]["interaction_id"] > 0  # names the source row


def test_empty_window_fails_clearly(settings, window_end, tmp_path):
    insert_interactions(settings, [("u1", "p1", "view", None, window_end + timedelta(days=1))])
    with pytest.raises(EmptyWindowError, match=r"no interactions in test_\w+\.interactions with occurred_at in \["):
        extract(settings, window_for(window_end), tmp_path, PipelineParams())
    assert not (tmp_path / "interactions.parquet").exists()


def test_nothing_valid_fails_with_the_reasons(settings, window_end, tmp_path):
    at = days_before(window_end, 1)
    insert_interactions(settings, [("u1", "p1", "clicked", None, at), ("u2", "p2", "purchase", -1, at)])
    with pytest.raises(NoValidDataError, match="unknown event_type.*clicked|negative value"):
        extract(settings, window_for(window_end), tmp_path, PipelineParams())


def test_too_many_invalid_rows_fail_instead_of_training_on_the_rest(settings, window_end, tmp_path):
    at = days_before(window_end, 1)
    rows = [("u1", "p1", "view", None, at)] * 7 + [("u1", "p1", "purchase", -1, at)] * 3
    insert_interactions(settings, rows)
    with pytest.raises(NoValidDataError, match=r"30\.0% of interactions .* max_invalid_fraction=20\.0%"):
        extract(settings, window_for(window_end), tmp_path, PipelineParams())
    result = extract(settings, window_for(window_end), tmp_path, PipelineParams(max_invalid_fraction=0.5))
    assert result.rows_kept == 7


def test_products_snapshot_keeps_active_flags(settings, window_end, tmp_path):
    insert_products(settings, [("p1", "One", "books", True), ("p2", "Two", None, False)])
    insert_interactions(settings, [("u1", "p1", "view", None, days_before(window_end, 1))])
    products = pq.read_table(extract(settings, window_for(window_end), tmp_path, PipelineParams()).products).to_pydict()
    assert dict(zip(products["product_id"], products["active"], strict=True)) == {"p1": True, "p2": False}
    assert products["category"] == ["books", None]
