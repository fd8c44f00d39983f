"""Published ids keep the type the shop declared (or the live version has): one odd id is an
invalid row, never a reason to turn every id into a string."""

from __future__ import annotations

import json
from datetime import timedelta

import pyarrow.parquet as pq
import pytest
from helpers import days_before, insert_interactions, live

from recsys.core import db
from recsys.core.params import PipelineParams
from recsys.core.window import Window
from recsys.pipeline import extract as extract_module
from recsys.pipeline.extract import extract, extracted_id_types
from recsys.pipeline.stages import run_pipeline
from recsys.storage import connect
from recsys.storage.reads import live_meta

# later windows are compared with an earlier live model of another window: let the gate pass
PARAMS = PipelineParams(max_map_drop=1.0)


def published_ids(settings) -> dict[str, list]:
    build = live(settings)
    found = {"user": [], "product": []}
    for _, record in build.entries("user_recs"):
        found["user"].append(record["user_id"])
        found["product"] += record["recommended_products"]
    for _, record in build.entries("similar_products"):
        found["product"] += [record["product_id"], *record["similar_products"]]
    for raw in build.client.hvals(build.keys.top_buys(build.name)):
        found["product"] += json.loads(raw)["top_buys"]
    return found


def some_product(settings) -> str:
    with db.connect(settings) as conn:
        return conn.execute("SELECT product_id FROM products WHERE active ORDER BY product_id LIMIT 1").fetchone()[0]


def test_a_junk_user_and_an_uncatalogued_product_change_no_other_id(settings, demo_loaded, window_end):
    insert_interactions(settings, [
        ("junk-user", some_product(settings), "view", None, days_before(window_end, 3)),
        ("5", "sku-x", "view", None, days_before(window_end, 2)),
    ])
    result = run_pipeline(settings, window_end, PARAMS)

    published = published_ids(settings)
    assert published["user"] and all(type(i) is int for i in published["user"])
    assert published["product"] and all(type(i) is int for i in published["product"])
    meta = live_meta(*connect(settings))
    assert (meta["id_types"]["user"], meta["id_types"]["product"]) == ("int", "int")

    report = json.loads((result.run.paths.extract / "report.json").read_text())
    dropped = report["interactions"]["examples"]
    user_reason = next(reason for reason in dropped if reason.startswith("user_id not an integer"))
    product_reason = next(reason for reason in dropped if reason.startswith("product_id not an integer"))
    assert dropped[user_reason][0]["user_id"] == "junk-user"
    assert dropped[product_reason][0]["product_id"] == "sku-x"


def test_a_configured_type_wins_and_later_runs_keep_the_live_types(settings, demo_loaded, window_end):
    run_pipeline(settings.model_copy(update={"user_id_type": "str"}), window_end - timedelta(days=1), PARAMS)
    published = published_ids(settings)
    assert all(type(i) is str for i in published["user"]) and all(type(i) is int for i in published["product"])

    run_pipeline(settings, window_end, PARAMS)  # unset: as the live version, though the ids are integers
    published = published_ids(settings)
    assert all(type(i) is str for i in published["user"]) and all(type(i) is int for i in published["product"])


def test_new_string_ids_do_not_flip_a_live_integer_type(settings, demo_loaded, window_end):
    run_pipeline(settings, window_end - timedelta(days=1), PARAMS)
    product = some_product(settings)
    # far more than the 1 % that inference tolerates
    insert_interactions(settings, [(f"guest-{i}", product, "view", None, days_before(window_end, 0.5)) for i in range(60)])
    result = run_pipeline(settings, window_end, PARAMS)
    assert all(type(i) is int for i in published_ids(settings)["user"])
    report = json.loads((result.run.paths.extract / "report.json").read_text())
    assert report["id_types"]["source"]["user"] == "as the live version publishes them"
    assert sum(n for reason, n in report["interactions"]["dropped"].items() if reason.startswith("user_id not")) == 60



def test_user_id_inference_counts_each_distinct_window_id_once(settings, window_end, tmp_path, monkeypatch):
    """The counts behind an inferred user id type, against a reference computed here: distinct
    ids of the window only, '' and NULL left out, canonical integers below 2**53 only."""
    monkeypatch.setattr(extract_module, "CSV_BLOCK_BYTES", 256)  # a few rows a block: ids seen again blocks later
    window = Window(start=window_end - timedelta(days=30), end=window_end)
    at = days_before(window_end, 1)
    user_ids = ["1", "42", "1", "-7", "0", "007", "-0", "+5", "1e3", " 12", "12 ", "\u00a0", "u1",
                "9007199254740991", "9007199254740992", "1" + "0" * 16, "", None, "1\n2"]
    rows = [(user, "p1", "view", None, at + timedelta(seconds=i)) for i, user in enumerate(user_ids)]
    rows.append(("outside", "p1", "view", None, window.start - timedelta(microseconds=1)))
    rows.append(("outside", "p1", "view", None, window.end))
    insert_interactions(settings, rows)
    extract(settings, window, tmp_path, PipelineParams(max_invalid_fraction=1.0))

    distinct = {user for user in user_ids if user}
    integers = {user for user in distinct if user in {"1", "42", "-7", "0", "9007199254740991"}}
    assert len(distinct) == 16 and len(integers) == 5
    source = extracted_id_types(tmp_path).source["user"]
    assert source == f"inferred: {len(integers)} of {len(distinct)} distinct user ids in the window are integers"


def _mixed_rows(window_end, user_id, odd_user_id) -> list[tuple]:
    """Rows of many users (``user_id(i)``) and a few odd ones (``odd_user_id(i)``), the odd ones
    with every other problem too: each problem's row is counted under the first rule it breaks."""
    at = days_before(window_end, 2)
    rows = [(user_id(i), f"p{i % 30}", "view", None, at + timedelta(seconds=i)) for i in range(3_000)]
    for i in range(3):
        user = odd_user_id(i)
        rows += [
            (user, f"p{i}", "view", None, at),
            (user, f"p{i}", "view", None, at),  # a duplicate
            (user, f"p{i}", "clicked", None, at),
            (user, f"p{i}", "purchase", -1.0, at),
            (user, "", "view", None, at),  # empty product_id comes first
            (user_id(i), f"p{i}", "clicked", None, at),
        ]
    return rows


@pytest.mark.parametrize(
    ("id_type", "user_id", "odd_user_id"),
    [("int", str, "user-{}".format), ("str", "user-{}".format, str)],
)
def test_inferred_user_id_type_validates_as_the_same_type_configured(
    settings, window_end, tmp_path, monkeypatch, id_type, user_id, odd_user_id
):
    """Inferred from the window while it streams, the user id type is known only at its end:
    the same report and rows as with that type configured from the start."""
    monkeypatch.setattr(extract_module, "CSV_BLOCK_BYTES", 4_096)  # the odd rows spread over blocks
    insert_interactions(settings, _mixed_rows(window_end, user_id, odd_user_id))
    window = Window(start=window_end - timedelta(days=30), end=window_end)
    inferred = extract(settings, window, tmp_path / "inferred", PipelineParams())
    configured = extract(
        settings.model_copy(update={"user_id_type": id_type}), window, tmp_path / "configured", PipelineParams()
    )

    assert extracted_id_types(inferred.extract_dir).user == id_type
    reports = [json.loads(result.report.read_text())["interactions"] for result in (inferred, configured)]
    source = {"inferred": extracted_id_types(inferred.extract_dir).source["user"],
              "configured": extracted_id_types(configured.extract_dir).source["user"]}
    assert json.dumps(reports[0]).replace(source["inferred"], source["configured"]) == json.dumps(reports[1])
    assert (sum(reports[0]["dropped"].values()), reports[0]["rows_read"]) == (18 if id_type == "int" else 15, 3_018)
    assert pq.read_table(inferred.interactions).equals(pq.read_table(configured.interactions))
