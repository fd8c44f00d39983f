"""Extract against a real PostgreSQL: window bounds, validation, clear errors."""

from __future__ import annotations

import io
import json
import logging
import shutil
import threading
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from helpers import days_before, insert_interactions, insert_products

from recsys.core import db
from recsys.core.errors import EmptyWindowError, NoValidDataError
from recsys.core.params import PipelineParams
from recsys.core.window import Window
from recsys.pipeline import extract as extract_module
from recsys.pipeline.extract import INTERACTIONS_SCHEMA, extract


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
    rows = [(f"u{i}", "p1", "view", None, at) for i in range(7)] + [(f"u{i}", "p1", "purchase", -1, at) for i in range(3)]
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


def test_a_row_is_counted_once_under_the_first_rule_it_breaks(settings, window_end, tmp_path):
    at = days_before(window_end, 1)
    good = [(f"u{i}", "p1", "view", None, at) for i in range(20)]
    bad = [
        (None, None, "clicked", -1.0, at),  # breaks four rules: counted as null user_id only
        ("\u00a0\t", "p1", "purchase", float("nan"), at),  # Unicode whitespace only: empty user_id
        ("u1", "", "purchase", 2e9, at),  # empty product_id before absurd value
    ]
    insert_interactions(settings, good + bad)
    result = extract(settings, window_for(window_end), tmp_path, PipelineParams(), progress=True)
    report = json.loads(result.report.read_text())["interactions"]
    assert report["dropped"] == {"null user_id": 1, "empty user_id": 1, "empty product_id": 1}
    assert report["examples"]["empty user_id"][0]["user_id"] == "\u00a0\t"
    assert (result.rows_read, result.rows_kept) == (23, 20)
    assert pq.read_table(result.interactions).schema == INTERACTIONS_SCHEMA


def test_empty_catalogue_gives_an_empty_products_snapshot(settings, window_end, tmp_path):
    insert_interactions(settings, [("u1", "p1", "view", None, days_before(window_end, 1))])
    products = pq.read_table(extract(settings, window_for(window_end), tmp_path, PipelineParams()).products)
    assert products.num_rows == 0
    assert products.column_names == ["product_id", "name", "category", "active", "attributes"]


def _interactions_behind_a_view(settings, rows: int, end, view_columns: str) -> None:
    """``rows`` valid interactions, one second apart up to a day before ``end``, read through a
    view named ``interactions`` whose columns are ``view_columns`` over the stored table: a real
    query that fails part-way through the COPY."""
    with db.connect(settings) as conn:
        conn.execute(
            "INSERT INTO interactions (user_id, product_id, event_type, value, occurred_at) "
            "SELECT 'u' || (n %% 97), 'p' || (n %% 13), 'view', NULL, %(start)s + n * interval '1 second' "
            "FROM generate_series(1, %(rows)s) AS n",
            {"start": end - timedelta(days=1, seconds=rows + 1), "rows": rows},
        )
        conn.execute("ALTER TABLE interactions RENAME TO stored_interactions")
        conn.execute(f"CREATE VIEW interactions AS SELECT {view_columns} FROM stored_interactions")


def _leftovers(directory) -> list[str]:
    """Everything a failed extract left behind: no output, no spilled slices."""
    return sorted(path.name for path in directory.iterdir())


def test_copy_failing_mid_stream_raises_and_publishes_nothing(settings, window_end, tmp_path):
    # rows stream out in occurred_at order; the 3000th fails after the first ones reached us
    _interactions_behind_a_view(
        settings,
        5_000,
        window_end,
        "interaction_id, user_id, product_id, event_type, "
        "CASE WHEN interaction_id < 3000 THEN value ELSE 1 / (interaction_id - interaction_id) END AS value, "
        "occurred_at",
    )
    with pytest.raises(psycopg.errors.DivisionByZero):
        extract(settings, window_for(window_end), tmp_path, PipelineParams())
    assert _leftovers(tmp_path) == []
    assert not [thread for thread in threading.enumerate() if thread.name == "extract-copy"]


def test_reader_failing_stops_the_copy_and_raises_its_own_error(settings, window_end, tmp_path, monkeypatch, caplog):
    # small blocks: the parser fails while the COPY still has far more rows than the pipe holds
    monkeypatch.setattr(extract_module, "CSV_BLOCK_BYTES", 4_096)
    _interactions_behind_a_view(
        settings,
        100_000,
        window_end,
        "interaction_id, user_id, product_id, event_type, "
        "CASE WHEN interaction_id < 1000 THEN value::text ELSE 'not a number' END AS value, occurred_at",
    )
    with caplog.at_level(logging.WARNING), pytest.raises(pa.ArrowInvalid, match="not a number"):
        extract(settings, window_for(window_end), tmp_path, PipelineParams())
    assert _leftovers(tmp_path) == []
    assert not [thread for thread in threading.enumerate() if thread.name == "extract-copy"]
    assert not [record for record in caplog.records if record.name.startswith("psycopg")]  # no failed rollback


def test_copy_to_gives_the_bytes_psycopg_copy_gives(settings, window_end):
    """The drain's psycopg2 COPY against iterating psycopg's Copy, on rows with quotes,
    newlines, NULLs, NaN and non-ASCII text."""
    at = days_before(window_end, 1)
    odd = ['a"b', "line\nbreak", "comma,here", "", None, "caf\u00e9 \u2603", "  "]
    rows = [(odd[i % len(odd)], odd[(i * 3) % len(odd)], "view", [None, 1.5, float("nan")][i % 3], at) for i in range(5_000)]
    insert_interactions(settings, rows)
    for name, params in (
        ("extract_interactions", {"start": window_end - timedelta(days=2), "end": window_end}),
        ("extract_older_negatives", {"start": window_end, "event_types": ["view", "it's"]}),
        ("extract_older_negatives", {"start": window_end, "event_types": []}),
    ):
        statement = db.sql_text(settings, name)
        with db.connect(settings) as conn, conn.cursor() as cur, cur.copy(statement, params) as copy:
            expected = b"".join(bytes(row) for row in copy)
        received = io.BytesIO()
        db.copy_to(settings, statement, params, received)
        assert received.getvalue() == expected
        if name == "extract_interactions":
            assert expected.count(b"\n") >= 5_000


def test_ids_with_newlines_survive_block_boundaries(settings, window_end, tmp_path, monkeypatch):
    """COPY quotes a value with a newline; Arrow must not split a row there, whatever the block size."""
    from recsys.core.window import window_ending

    rows = [(f"user-{i:05d}", f"p{i % 50}", "view", 1.0, days_before(window_end, 3)) for i in range(20_000)]
    odd_rows = range(0, 20_000, 997)
    for k in odd_rows:
        rows[k] = (f"odd\nuser {k}", "p1", "view", 1.0, days_before(window_end, 3))
    insert_interactions(settings, rows)
    monkeypatch.setattr(extract_module, "CSV_BLOCK_BYTES", 4096)  # hundreds of block boundaries
    params = PipelineParams()
    result = extract(settings, window_ending(window_end, params), tmp_path / "x", params)
    users = pq.read_table(result.interactions)["user_id"].to_pylist()
    assert result.rows_kept == result.rows_read == 20_000
    assert {u for u in users if "\n" in u} == {f"odd\nuser {k}" for k in odd_rows}


# --- what the extract drops or flags beyond single-row validity: generated data only ------------


def _report(result) -> dict:
    return json.loads(result.report.read_text())["interactions"]


def test_exact_duplicates_are_collapsed_into_the_first_even_blocks_apart(settings, window_end, tmp_path, monkeypatch):
    monkeypatch.setattr(extract_module, "CSV_BLOCK_BYTES", 4_096)  # hundreds of blocks
    at = days_before(window_end, 2)
    rows = [(f"user-{i:05d}", f"p{i % 40}", "view", None, at + timedelta(seconds=i)) for i in range(6_000)]
    first, last = rows[0], rows[-1]
    duplicated = [
        first,  # 6,000 rows after its original: many blocks apart
        first,
        last,
        ("user-00007", "p7", "purchase", 2.0, at),
        ("user-00007", "p7", "purchase", 2.0, at),  # a pair whose value is not NULL
    ]
    near_misses = [  # one field differs from a row above: not duplicates
        (first[0], first[1], "view", 1.0, first[4]),  # value 1 is not NULL
        (first[0], first[1], "add_to_cart", None, first[4]),
        (first[0], first[1], "view", None, first[4] + timedelta(microseconds=1)),
        (first[0], "p1", "view", None, first[4]),
        ("user-00001", first[1], "view", None, first[4]),  # same length user id: same fingerprint
        ("user-00007", "p7", "purchase", 3.0, at),
    ]
    insert_interactions(settings, rows + duplicated + near_misses)
    result = extract(settings, window_for(window_end), tmp_path, PipelineParams())

    report = _report(result)
    assert report["dropped"] == {extract_module.DUPLICATE: 4}
    assert (result.rows_read, result.rows_kept) == (6_011, 6_007)
    assert report["rows_invalid"] == 0
    examples = report["examples"][extract_module.DUPLICATE]
    # each dropped copy names the interaction it repeats: the first one inserted
    assert [(e["interaction_id"], e["duplicate_of"]) for e in examples] == [(6_001, 1), (6_002, 1), (6_003, 6_000), (6_005, 6_004)]
    assert examples[0]["user_id"] == "user-00000" and examples[0]["value"] is None
    table = pq.read_table(result.interactions)
    assert table.num_rows == 6_007
    keys = list(zip(*(table[name].to_pylist() for name in ("user_id", "product_id", "event_type", "value", "occurred_at")), strict=True))
    assert len(set(keys)) == len(keys)


def test_blocks_in_time_order_or_not_give_the_same_extract(settings, window_end, tmp_path, monkeypatch):
    """Blocks already in time order go to their slices without being sorted; the files and
    report are those of sorting every block: blocks in time order and out of it, duplicates
    blocks apart, invalid rows."""
    monkeypatch.setattr(extract_module, "CSV_BLOCK_BYTES", 4_096)  # hundreds of blocks
    at = days_before(window_end, 20)
    rows = [(f"u{i % 300}", f"p{i % 40}", "view", None, at + timedelta(minutes=7 * i)) for i in range(4_000)]
    rows += [(f"u{i}", f"p{i}", ["view", "clicked"][i % 2], [None, -1.0][i % 2], at + timedelta(minutes=(7919 * i) % 28_000))
             for i in range(500)]  # out of time order, a quarter invalid
    rows += rows[:50] + rows[4_000:4_050]  # duplicates, in order and not
    insert_interactions(settings, rows)
    window = window_for(window_end)

    def extracted(name: str) -> tuple[pa.Table, dict]:
        result = extract(settings, window, tmp_path / name, PipelineParams(max_invalid_fraction=0.5))
        return pq.read_table(result.interactions), json.loads(result.report.read_text())

    with monkeypatch.context() as always_sorted:
        always_sorted.setattr(extract_module, "_in_time_order", lambda slices: False)
        expected_table, expected_report = extracted("always sorted")
    table, report = extracted("as they come")
    assert report["interactions"]["dropped"][extract_module.DUPLICATE] >= 75  # the invalid copies are dropped first
    assert table.equals(expected_table)
    assert report == expected_report


def test_a_fingerprint_collision_is_not_taken_for_a_duplicate():
    """Rows that differ only in a user id of the same length share a fingerprint; the exact
    comparison keeps them apart."""
    table = pa.table(
        {
            "interaction_id": pa.array([1, 2, 3], pa.int64()),
            "user_id": ["ua", "ub", "ua"],
            "product_id": ["p1", "p1", "p1"],
            "event_type": ["view", "view", "view"],
            "value": pa.array([None, None, None], pa.float64()),
            "occurred_at_us": pa.array([10, 10, 10], pa.int64()),
        }
    )
    product_codes = extract_module._Products(pa.chunked_array([], pa.string())).codes(table["product_id"])
    fingerprints = extract_module._Fingerprints(pa.array(["view"])).of(table, product_codes, None)
    assert len(set(fingerprints.to_pylist())) == 1
    report = extract_module.ValidationReport()
    kept = extract_module._collapse_duplicates(table.append_column(extract_module.FINGERPRINT, fingerprints), report)
    assert kept["interaction_id"].to_pylist() == [1, 2]
    assert report.dropped == {extract_module.DUPLICATE: 1}
    assert report.examples[extract_module.DUPLICATE][0]["duplicate_of"] == 1


def test_products_missing_from_the_catalogue_are_listed_by_interactions(settings, window_end, tmp_path, caplog):
    at = days_before(window_end, 1)
    insert_products(settings, [(f"p{i}", f"Product {i}", "books", True) for i in range(3)])
    known = [(f"u{i}", f"p{i % 3}", "view", None, at + timedelta(seconds=i)) for i in range(40)]
    ghosts = [
        (f"u{i}", product, "view", None, at + timedelta(seconds=100 + i))
        for i, product in enumerate(["ghost-a"] * 5 + ["ghost-b"] * 2 + ["ghost-c"])
    ]
    insert_interactions(settings, known + ghosts)
    with caplog.at_level(logging.WARNING, logger="recsys.pipeline.extract"):
        result = extract(settings, window_for(window_end), tmp_path, PipelineParams())

    assert result.rows_kept == 48  # kept: they still say something about their users
    missing = _report(result)["missing_from_catalogue"]
    assert missing == {
        "products": 3,
        "interactions": 8,
        "top": [
            {"product_id": "ghost-a", "interactions": 5},
            {"product_id": "ghost-b", "interactions": 2},
            {"product_id": "ghost-c", "interactions": 1},
        ],
    }
    (warning,) = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert "kept 8 interactions on 3 products missing from the catalogue" in warning
    assert "'ghost-a' x 5, 'ghost-b' x 2, 'ghost-c' x 1" in warning


def test_purchases_of_zero_or_less_are_invalid_other_zero_values_are_not(settings, window_end, tmp_path):
    at = days_before(window_end, 1)
    good = [(f"u{i}", "p1", "view", None, at + timedelta(seconds=i)) for i in range(30)]
    insert_interactions(
        settings,
        good
        + [
            ("u1", "p1", "purchase", 0.0, at),  # zero quantity: invalid
            ("u2", "p1", "purchase", -2.0, at),  # negative: under the earlier "negative value" rule
            ("u3", "p1", "purchase", None, at),  # NULL means 1: valid
            ("u4", "p1", "purchase", 0.5, at),  # valid
            ("u5", "p1", "rating", 0.0, at),  # not a purchase: valid
        ],
    )
    result = extract(settings, window_for(window_end), tmp_path, PipelineParams())
    report = _report(result)
    assert report["dropped"] == {"purchase quantity <= 0": 1, "negative value": 1}
    assert report["examples"]["purchase quantity <= 0"][0]["user_id"] == "u1"
    assert result.rows_kept == 33


def test_timestamps_in_the_future_are_invalid(settings, tmp_path):
    now = datetime.now(UTC)
    window = Window(start=now - timedelta(days=10), end=now + timedelta(days=1))  # ends after now
    good = [(f"u{i}", "p1", "view", None, now - timedelta(hours=1, seconds=i)) for i in range(30)]
    insert_interactions(settings, good + [("u1", "p2", "view", None, now + timedelta(hours=2))])
    result = extract(settings, window, tmp_path, PipelineParams())
    report = _report(result)
    (reason,) = report["dropped"]
    assert reason.startswith("occurred_at after the window end or in the future (> ")
    assert report["dropped"][reason] == 1
    assert report["examples"][reason][0]["product_id"] == "p2"
    assert result.rows_kept == 30


def test_one_warning_line_sums_up_everything_left_out(settings, window_end, tmp_path, caplog):
    at = days_before(window_end, 1)
    insert_products(settings, [("p1", "One", "books", True)])
    good = [(f"u{i}", "p1", "view", None, at + timedelta(seconds=i)) for i in range(40)]
    insert_interactions(
        settings,
        good + [good[0], ("u1", "p1", "purchase", 0.0, at), ("u2", "p1", "clicked", None, at), ("u3", "ghost", "view", None, at)],
    )
    with caplog.at_level(logging.INFO, logger="recsys.pipeline.extract"):
        result = extract(settings, window_for(window_end), tmp_path, PipelineParams())
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    for part in ("dropped 3 of 44 rows", "exact duplicate", "purchase quantity <= 0", "unknown event_type", "'ghost' x 1"):
        assert part in warnings[0]
    assert (result.rows_read, result.rows_kept) == (44, 41)


def test_rows_after_the_window_end_are_invalid_even_if_an_adapted_query_lets_them_in(settings, window_end, tmp_path):
    """A shop adapting extract_interactions.sql (README) may drop the end bound: the rows after the
    window end are then refused by the extract itself, not trained on."""
    sql_dir = tmp_path / "sql"
    shutil.copytree(settings.sql_dir, sql_dir)
    statement = (sql_dir / "extract_interactions.sql").read_text()
    (sql_dir / "extract_interactions.sql").write_text(statement.replace("AND occurred_at < %(end)s", ""))
    adapted = settings.model_copy(update={"sql_dir": sql_dir})
    good = [(f"u{i}", "p1", "view", None, days_before(window_end, 1)) for i in range(30)]
    insert_interactions(settings, good + [("late", "p1", "view", None, window_end), ("later", "p1", "view", None, window_end + timedelta(days=1))])
    result = extract(adapted, window_for(window_end), tmp_path / "out", PipelineParams())
    report = _report(result)
    (reason,) = report["dropped"]
    assert reason.startswith("occurred_at after the window end or in the future")
    assert sorted(example["user_id"] for example in report["examples"][reason]) == ["late", "later"]
    assert (result.rows_read, result.rows_kept) == (32, 30)


def test_distinct_user_ids_count_what_a_set_of_the_window_s_ids_counts():
    # integer ids gathered as int64 values, the others as text: the counts of one set of texts
    from recsys.core import ids

    window = Window(datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 2, tzinfo=UTC))
    start_us = extract_module._epoch_us(window.start)
    texts = ["1", "2", "-3", "007", "+5", "-0", "x", "", None, " ", str(2**53), str(2**53 - 1), "é", "12345678901234567890"]
    blocks = []
    for block in range(5):
        user_ids = [texts[(block * 7 + row) % len(texts)] for row in range(40)] + [str(block * 1000 + row) for row in range(30)]
        # some rows outside the window: before it, at its end
        occurred = [start_us - 1 if row % 11 == 0 else start_us + 86_400_000_000 if row % 13 == 0 else start_us + row
                    for row in range(len(user_ids))]
        blocks.append(pa.table({"user_id": pa.array(user_ids, pa.string()), "occurred_at_us": pa.array(occurred, pa.int64())}))
    distinct = extract_module._DistinctUserIds(window)
    for table in blocks:
        integer, values = ids.integer_id_values(table["user_id"])
        distinct.add(table, pa.chunked_array([extract_module._null_as_false(pc.invert(integer))]), pa.chunked_array([values]))
    in_window = {
        user_id for table in blocks for user_id, at in zip(table["user_id"].to_pylist(), table["occurred_at_us"].to_pylist(), strict=True)
        if user_id not in (None, "") and start_us <= at < start_us + 86_400_000_000
    }
    integers = sum(ids.fits("int", user_id) for user_id in in_window)
    assert distinct.id_type() == extract_module._inferred_id_type(integers, len(in_window), "user ids in the window")
    assert 0 < integers < len(in_window)


def test_distinct_integers_count_what_a_set_counts():
    """Values flagged by value (growing the flags block after block) and the others (negative,
    beyond the flags) sorted: together the count of one set."""
    rng = np.random.default_rng(11)
    counter, seen = extract_module._DistinctIntegers(), set()
    for top in (10, 1_000, 100_000, 100):
        values = rng.integers(0, top, 500)
        values[:5] = [-7, -1, 2**40, extract_module.MAX_ID_VALUE_FLAGS, extract_module.MAX_ID_VALUE_FLAGS - 1]
        counter.add(values)
        seen.update(values.tolist())
    counter.add(np.array([], np.int64))
    assert counter.count() == len(seen)


def test_repeated_fingerprints_are_those_value_counts_finds_repeated():
    rng = np.random.default_rng(3)
    for size in (0, 1, 2, 1000):
        values = rng.integers(0, max(size // 3, 1), size, dtype=np.uint64)
        counts = pc.value_counts(pa.array(values))
        expected = counts.field("values").filter(pc.greater(counts.field("counts"), 1)).to_numpy()
        assert extract_module._repeated(values).tolist() == sorted(expected.tolist())


def test_per_product_checks_match_the_same_checks_on_every_row():
    """The product checks are computed once per distinct product id and looked up by each row's
    product number: the same flags as the checks run on every row, block after block, products
    first seen in later blocks included."""
    from recsys.core import ids

    catalogue = pa.chunked_array([pa.array(["1", "2", "p3", " "])])
    products = extract_module._Products(catalogue)
    blocks = [
        ["1", "2", None, "1", "ghost"],
        ["2", "", "\u00a0", None, "007", "p3", "9"],
        [None, None],
        ["9", "ghost", "1", " ", "12", "x y"],
    ]
    for block in blocks:
        product_ids = pa.chunked_array([pa.array(block, pa.string())])
        table = pa.table({"product_id": product_ids})
        block_view = extract_module._Block(table, products, products.codes(product_ids))
        assert block_view.per_product(products.blank).to_pylist() == extract_module._blank(product_ids).to_pylist()
        assert block_view.per_product(products.not_integer).to_pylist() == pc.invert(ids.integer_ids(product_ids)).to_pylist()
        missing = pc.invert(pc.is_in(product_ids, value_set=catalogue))
        assert block_view.per_product(products.missing).to_pylist() == pc.if_else(pc.is_null(product_ids), None, missing).to_pylist()
    assert sorted(products.missing_ids().to_pylist()) == sorted(["ghost", "", "\u00a0", "007", "9", "12", "x y"])


def test_product_numbers_by_value_are_those_by_text(monkeypatch):
    """Blocks of canonical integer ids are numbered through the array by value, other blocks by
    text: the same numbers as numbering every block by text, with ids first seen either way,
    beyond the array's first size, and near misses ("007", "-3", "0x5", "+4") kept apart."""
    rng = np.random.default_rng(5)
    blocks = [[str(value) for value in rng.integers(1, 300, 50)] for _ in range(4)]
    blocks.insert(1, ["7", "007", "12", None, "-3", "0x5", "+4", "p1", "12", "0"])
    blocks.append([str(value) for value in rng.integers(0, 70_000, 200)])  # grows the array
    blocks.append(["7", "0", "5000000000", "65536", "7"])  # one value beyond the array's range
    blocks.append([str(value) for value in rng.integers(0, 70_000, 200)])

    def numbered() -> tuple[list[list[int]], list[str]]:
        products = extract_module._Products(pa.chunked_array([], pa.string()))
        codes = [products.codes(pa.chunked_array([pa.array(block, pa.string())])).to_pylist() for block in blocks]
        return codes, products.ids.to_pylist()

    codes, product_ids = numbered()
    assert len(set(product_ids)) == len(product_ids)
    for block, block_codes in zip(blocks, codes, strict=True):
        assert [None if code is None else product_ids[code] for code in block_codes] == block
    monkeypatch.setattr(extract_module, "MAX_PRODUCT_VALUE_NUMBERS", 0)  # every block by text
    assert numbered() == (codes, product_ids)


def test_fingerprints_by_user_id_value_dedupe_as_by_length(settings, window_end, tmp_path, monkeypatch):
    """Integer user ids enter the fingerprints by value (rows of different users with ids of the
    same length no longer share one), other ids by length: the extract is the same as with
    lengths only, duplicates, non-integer ids and same-length near misses included."""
    monkeypatch.setattr(extract_module, "CSV_BLOCK_BYTES", 4_096)  # many blocks
    at = days_before(window_end, 3)
    rows = [(str(1000 + i % 500), f"p{i % 30}", "view", None, at + timedelta(seconds=i // 3)) for i in range(3_000)]
    rows += [("u-x", "p1", "view", None, at), ("007", "p1", "view", None, at), ("1001", "p1", "view", None, at)]
    rows += rows[:40] + rows[-3:]  # duplicates, of integer and other ids
    insert_interactions(settings, rows)
    window = window_for(window_end)

    def extracted(name: str) -> tuple[pa.Table, dict]:
        result = extract(settings, window, tmp_path / name, PipelineParams(), live_id_types={"user": "int"})
        return pq.read_table(result.interactions), _report(result)

    with monkeypatch.context() as by_length:
        by_length.setattr(extract_module._Block, "user_keys", lambda block: pc.binary_length(block["user_id"]))
        expected_table, expected_report = extracted("by length")
    table, report = extracted("by value")
    assert report["dropped"][extract_module.DUPLICATE] == 42  # "u-x" and "007" are invalid for int ids
    assert report["dropped"][next(reason for reason in report["dropped"] if reason.startswith("user_id not an integer"))] == 4
    assert table.equals(expected_table)
    assert report == expected_report

    product_codes = pa.chunked_array([pa.array([0, 0], pa.int32())])
    same_length = pa.table({"interaction_id": [1, 2], "user_id": ["1001", "1002"], "product_id": ["p", "p"],
                            "event_type": ["view", "view"], "value": pa.array([None, None], pa.float64()),
                            "occurred_at_us": [5, 5]})
    by_value = extract_module._Fingerprints(pa.array(["view"])).of(same_length, product_codes, pa.chunked_array([[1001, 1002]]))
    by_length = extract_module._Fingerprints(pa.array(["view"])).of(same_length, product_codes, None)
    assert len(set(by_value.to_pylist())) == 2 and len(set(by_length.to_pylist())) == 1


def test_product_checks_name_the_row_field_and_value_across_blocks(settings, window_end, tmp_path, monkeypatch):
    """Each product check still fires, with its example naming the row, when the product first
    appears blocks into the COPY; products missing from the catalogue are counted on kept rows."""
    monkeypatch.setattr(extract_module, "CSV_BLOCK_BYTES", 4_096)
    at = days_before(window_end, 2)
    insert_products(settings, [(str(i), f"Product {i}", "books", True) for i in range(20)])
    good = [(f"u{i}", str(i % 20), "view", None, at + timedelta(seconds=i)) for i in range(4_000)]
    late = [
        ("u1", "p-late", "view", None, at),  # not an integer
        ("u2", " ", "view", None, at),  # blank
        ("u3", "77", "view", None, at),  # valid, missing from the catalogue
        ("u4", "77", "clicked", None, at),  # invalid for its event type: not counted as missing
        ("u5", "78", "clicked", None, at),  # only on an invalid row: not listed
    ]
    insert_interactions(settings, good + late)
    result = extract(settings, window_for(window_end), tmp_path, PipelineParams(), live_id_types={"product": "int"})
    report = _report(result)
    not_integer = next(reason for reason in report["dropped"] if reason.startswith("product_id not an integer"))
    assert report["dropped"][not_integer] == 1 and report["dropped"]["empty product_id"] == 1
    assert report["examples"][not_integer][0]["product_id"] == "p-late"
    assert report["examples"][not_integer][0]["interaction_id"] == 4_001
    assert report["examples"]["empty product_id"][0] | {"occurred_at_us": None} == {
        "interaction_id": 4_002, "user_id": "u2", "product_id": " ", "event_type": "view", "value": None, "occurred_at_us": None}
    assert report["missing_from_catalogue"]["top"] == [{"product_id": "77", "interactions": 1}]
    assert (result.rows_read, result.rows_kept) == (4_005, 4_001)
