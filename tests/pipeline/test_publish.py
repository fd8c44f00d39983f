"""Publishing to a real Redis: key layout, exclusions, atomic switch, freshness, no empty results."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import numpy as np
import pytest
from helpers import days_before, insert_interactions, live, published_entries, stage, stray_builds

from recsys.core import db
from recsys.core.errors import EmptyResultError, StaleVersionError
from recsys.core.ids import fits, id_out, integer_ids
from recsys.core.params import PipelineParams
from recsys.core.window import window_ending
from recsys.pipeline.publish.stage import json_id_tokens, json_list_objects, publish
from recsys.pipeline.stages import run_pipeline
from recsys.storage import connect
from recsys.storage.builds import bucket_states
from recsys.storage.reads import live_build, live_meta


def build_states(build):
    return bucket_states(build.client, build.keys, build.name)


def purchased_and_inactive(settings, window):
    with db.connect(settings) as conn:
        bought = conn.execute(
            "SELECT DISTINCT user_id, product_id FROM interactions "
            "WHERE event_type = 'purchase' AND occurred_at >= %s AND occurred_at < %s",
            (window.start, window.end),
        ).fetchall()
        inactive = {row[0] for row in conn.execute("SELECT product_id FROM products WHERE NOT active")}
    return {(int(u), int(p)) for u, p in bought}, {int(p) for p in inactive}


def test_published_layout_and_exclusions(settings, demo_loaded, window_end):
    params = PipelineParams(top_n=8)
    result = run_pipeline(settings, window_end, params)
    build = live(settings)

    meta = build.meta()
    assert meta["version"] == result.publish.version
    assert meta["data_end"] == window_end.isoformat()
    assert meta["metrics"]["model"]["map"] > meta["metrics"]["popularity"]["map"]
    assert build.entry_counts()["user_recs"] == result.publish.users == meta["counts"]["users"]
    # every bucket holds part of the users (the demo shop has hundreds)
    assert all(state.found["user_recs"] > 0 for state in build_states(build))

    bought, inactive = purchased_and_inactive(settings, window_ending(window_end, params))
    assert inactive, "the demo shop has inactive products"
    for user_id, record in build.entries("user_recs"):
        assert record["user_id"] == int(user_id)  # integer ids stay integers
        products = record["recommended_products"]
        assert 0 < len(products) <= 8 and len(set(products)) == len(products)
        assert not inactive & set(products)
        assert not {(record["user_id"], p) for p in products} & bought

    some_user, some_entry = next(build.entries("user_recs"))
    # the one lookup a shop page makes: HGET of the user's bucket in the live build
    raw = build.client.hget(build.keys.user_recs(build.name, some_user), some_user)
    assert build.user_recommendations(some_user) == some_entry == json.loads(raw)

    overall = build.top_buys()["top_buys"]
    assert len(overall) == params.top_buys_n and not inactive & set(overall)
    active_product = overall[0]
    similar = build.similar_products(str(active_product))
    assert similar["product_id"] == active_product
    assert active_product not in similar["similar_products"]
    assert not inactive & set(similar["similar_products"])
    category = build.top_buys(category="books")
    assert category is None or category["category"] == "books"


def test_bought_together_leads_with_planted_co_purchases(settings, demo_loaded, window_end):
    """Every active product gets a list (complements, filled with similar products); a pair bought
    together in many baskets comes first for each other; inactive products never appear."""
    params = PipelineParams(bought_together_n=5)
    with db.connect(settings) as conn:
        first, second = (row[0] for row in conn.execute(
            "SELECT product_id FROM products WHERE active ORDER BY product_id DESC LIMIT 2"
        ))
    insert_interactions(settings, [
        (f"{90_000 + buyer}", product, "purchase", 1, days_before(window_end, 2 + buyer % 20) - timedelta(minutes=minute))
        for buyer in range(40) for minute, product in enumerate((first, second))
    ])
    run_pipeline(settings, window_end, params)
    build = live(settings)

    meta = build.meta()
    assert build.entry_counts()["bought_together"] == meta["counts"]["products_with_bought_together"]
    assert meta["counts"]["products_with_bought_together"] >= meta["counts"]["products_with_similar"] > 0
    assert build.bought_together(str(first))["bought_together"][0] == int(second)
    assert build.bought_together(str(second))["bought_together"][0] == int(first)
    _, inactive = purchased_and_inactive(settings, window_ending(window_end, params))
    for product_id, record in build.entries("bought_together"):
        assert record["product_id"] == int(product_id) and int(product_id) not in inactive
        together = record["bought_together"]
        assert 0 < len(together) <= 5 and len(set(together)) == len(together)
        assert record["product_id"] not in together and not inactive & set(together)


def test_rerun_is_idempotent(settings, demo_loaded, window_end):
    first = run_pipeline(settings, window_end, PipelineParams())
    before = published_entries(settings)
    second = run_pipeline(settings, window_end, PipelineParams())
    assert second.publish.version == first.publish.version
    assert published_entries(settings) == before
    assert stray_builds(settings) == set()


def test_older_run_never_replaces_a_fresher_live_version(settings, demo_loaded, window_end):
    fresh = run_pipeline(settings, window_end, PipelineParams())
    with pytest.raises(StaleVersionError, match="newer than this run's"):
        run_pipeline(settings, window_end - timedelta(days=2), PipelineParams())
    assert live_meta(*connect(settings))["version"] == fresh.publish.version
    assert stray_builds(settings) == set()


def test_replaced_version_stays_readable_then_expires(settings, demo_loaded, window_end):
    old = run_pipeline(settings, window_end, PipelineParams())
    new = run_pipeline(settings, window_end, PipelineParams(factors=16))
    client, keys = connect(settings)
    assert live_meta(client, keys)["version"] == new.publish.version != old.publish.version
    [kept] = client.lrange(keys.history(), 0, -1)
    assert kept.startswith(old.publish.version + ".")
    kept_states = bucket_states(client, keys, kept)
    assert sum(state.found["user_recs"] for state in kept_states) == old.publish.users
    assert all(0 < ttl <= settings.previous_version_ttl_seconds for state in kept_states for ttl in state.ttls.values()
               if ttl != -2)
    # live keys never expire
    assert all(ttl in (-1, -2) for state in build_states(live(settings)) for ttl in state.ttls.values())


def test_reader_polling_during_publish_only_sees_complete_versions(settings, demo_loaded, window_end):
    """Two versions of different sizes and list lengths; every atomic read must match one of them."""
    first = run_pipeline(settings, window_end - timedelta(days=20), PipelineParams(top_n=3))
    client, keys = connect(settings)
    probe_user = next(live(settings).entries("user_recs"))[0]
    seen, errors, stop = set(), [], threading.Event()

    def poll():
        # as a reader does: resolve the pointer, then read that build (its keys never change)
        reader, _ = connect(settings)
        while not stop.is_set():
            build = live_build(reader, keys)
            meta = build.meta()
            counts, top_n = meta["counts"], meta["params"]["top_n"]
            seen.add(build.version)
            if build.entry_counts()["user_recs"] != counts["users"]:
                errors.append(f"{build.version}: {build.entry_counts()} users, meta says {counts}")
            probe = build.user_recommendations(probe_user)
            if probe and len(probe["recommended_products"]) > top_n:
                errors.append(f"{build.version}: a list longer than its version's top_n")

    reader_thread = threading.Thread(target=poll)
    reader_thread.start()
    try:
        second = run_pipeline(settings, window_end, PipelineParams(top_n=12))
    finally:
        stop.set()
        reader_thread.join()
    assert not errors, errors[:3]
    assert first.publish.users != second.publish.users
    assert seen <= {first.publish.version, second.publish.version}
    assert second.publish.version in seen or live_meta(client, keys)["version"] == second.publish.version


def test_empty_result_is_refused_and_live_kept(settings, demo_loaded, window_end):
    live = run_pipeline(settings, window_end - timedelta(days=1), PipelineParams())
    with db.connect(settings) as conn:
        conn.execute("UPDATE products SET active = FALSE")
    params = PipelineParams()
    paths = stage(settings, window_end, params)
    with pytest.raises(EmptyResultError, match="nothing published"):
        publish(settings, paths.matrix, paths.model, paths.evaluation / "report.json", params)
    assert live_meta(*connect(settings))["version"] == live.publish.version
    assert stray_builds(settings) == set()


def test_string_ids_stay_strings(settings, window_end):
    rows = []
    for user in range(40):
        for step, product in enumerate(("SKU-%02d" % ((user + k) % 12) for k in range(6))):
            when = days_before(window_end, 20 - step * 3)
            rows.append((f"user-{user:03d}", product, "purchase" if step % 2 else "view", 1.0, when))
    insert_interactions(settings, rows)
    with db.connect(settings) as conn, conn.cursor() as cur:
        cur.executemany(db.sql_text(settings, "upsert_product"),
                        [{"product_id": "SKU-%02d" % i, "name": str(i), "category": None, "active": True} for i in range(12)])
    params = PipelineParams(factors=4, iterations=5)
    paths = stage(settings, window_end, params)
    publish(settings, paths.matrix, paths.model, paths.evaluation / "report.json", params)
    record = live(settings).user_recommendations("user-007")
    assert record["user_id"] == "user-007"
    assert all(isinstance(p, str) and p.startswith("SKU-") for p in record["recommended_products"])


def test_integer_ids_are_only_what_json_numbers_keep():
    import pyarrow as pa

    ids = ["1", "22", "-3", str(2**53 - 1), "007", "a", str(2**60), "-0", "", "1.0"]
    assert integer_ids(pa.array(ids)).to_pylist() == [True, True, True, True, False, False, False, False, False, False]
    # the API's check of one id (no Arrow) says the same, also of what only a regex engine could trip on
    more = [*ids, str(2**53), str(-(2**53) + 1), "12\n", " 1", "+1", "١٢", "9" * 17]
    assert [fits("int", i) for i in more] == integer_ids(pa.array(more)).to_pylist()


@pytest.mark.parametrize(
    "ids",
    [
        # every id an int64: the leading-zero check
        ["1", "0", "-0", "007", "-7", str(2**53 - 1), str(2**53), str(-(2**53) + 1), str(-(2**53)),
         str(2**63 - 1), str(-(2**63)), "00", "1" + "0" * 15, None],
        # hexadecimal, which Arrow's int64 parser takes: not canonical
        ["0x5", "0X1f", "0x0", "-00", "10", None],
        # some id no int64 at all: the regex
        ["1", "-0", "+5", "x", None, "١٢", "12\n", str(2**64)],
    ],
)
def test_integer_ids_agree_with_the_check_of_one_id(ids):
    import pyarrow as pa

    expected = [None if i is None else fits("int", i) for i in ids]
    assert integer_ids(pa.array(ids, pa.string())).to_pylist() == expected
    assert integer_ids(pa.chunked_array([ids[:3], ids[3:]], pa.string())).to_pylist() == expected


@pytest.mark.parametrize(
    ("ids", "id_type"),
    [
        (["1", "22", "-3", str(2**53 - 1)], "int"),
        (["1", "22", "-3"], "str"),
        (["1", "007"], "str"),
        (["SKU-1", 'say "hi"', "back\\slash", "tab\there", "caf\u00e9", "\u7d20", "\U0001f600", "", " "], "str"),
    ],
)
def test_column_wise_json_is_what_json_dumps_writes(ids, id_type):
    """The vectorised payloads are byte-for-byte what json.dumps of the typed ids gives."""
    import pyarrow as pa

    out = id_out(id_type)
    tokens = json_id_tokens(pa.array(ids), id_type)
    assert tokens.to_pylist() == [json.dumps(out(i)) for i in ids]

    lists = np.array([[len(ids) - 1, 0, -1], [-1, -1, -1], [1 % len(ids), -1, -1]], dtype=np.int32)
    owners = pa.array([ids[0], ids[-1], ids[1 % len(ids)]])
    payloads = json_list_objects("user_id", json_id_tokens(owners, id_type), "recommended_products", tokens, lists)
    expected = [
        json.dumps({"user_id": out(owner), "recommended_products": [out(ids[i]) for i in row if i >= 0]},
                   separators=(",", ":"))
        for owner, row in zip(owners.to_pylist(), lists, strict=True)
    ]
    assert payloads.to_pylist() == expected


def test_shards_cover_every_user_once():
    from recsys.pipeline.publish.stage import shard_users

    for n_users, shards in [(10, 3), (7, 7), (5, 8), (1000, 16)]:
        parts = [shard_users(n_users, shard, shards) for shard in range(shards)]
        assert sorted(np.concatenate(parts).tolist()) == list(range(n_users))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_a_missing_shard_stops_the_switch(settings, demo_loaded, window_end):
    from recsys.pipeline.publish.stage import (
        finish_publish,
        new_attempt,
        prepare_publish,
        publish_shard,
    )

    live = run_pipeline(settings, window_end - timedelta(days=1), PipelineParams())
    params = PipelineParams()
    paths = stage(settings, window_end, params)
    attempt = new_attempt()
    prepare_publish(settings, paths.matrix, paths.model, params, attempt)
    done = [publish_shard(settings, paths.matrix, paths.model, params, attempt, shard, 3) for shard in (0, 2)]
    with pytest.raises(EmptyResultError, match=r"shards \[0, 2\] finished, expected 0\.\.2"):
        finish_publish(settings, paths.matrix, paths.model, paths.evaluation / "report.json", params, attempt, done, 3)
    assert live_meta(*connect(settings))["version"] == live.publish.version
    assert stray_builds(settings) == set()


def test_chunks_and_round_trips_do_not_change_what_is_published(settings, demo_loaded, window_end, monkeypatch):
    # users ranked a few at a time from the factors on disk, payloads built per round trip of
    # small HSETs: the same entries as one chunk, one HSET per bucket
    from recsys.pipeline.publish import stage as publish_module
    from recsys.storage import builds as builds_module

    params = PipelineParams(top_n=5)
    paths = stage(settings, window_end, params)
    publish(settings, paths.matrix, paths.model, paths.evaluation / "report.json", params)
    in_one_batch = published_entries(settings)
    monkeypatch.setattr(publish_module, "STORED_USERS_CHUNK", 7)
    monkeypatch.setattr(builds_module, "HSET_CHUNK", 3)
    monkeypatch.setattr(builds_module, "HSETS_PER_ROUND_TRIP", 2)
    publish(settings, paths.matrix, paths.model, paths.evaluation / "report.json", params, shards=2)
    assert len(in_one_batch) > 20
    assert published_entries(settings) == in_one_batch


def test_a_publish_reports_the_seconds_of_each_phase(settings, demo_loaded, window_end):
    """The speed benchmark's public hook: scoring, similar products and writing, timed apart."""
    from recsys.pipeline.publish.stage import PhaseTimings

    params = PipelineParams()
    paths = stage(settings, window_end, params)
    timings = PhaseTimings()
    publish(settings, paths.matrix, paths.model, paths.evaluation / "report.json", params, shards=2, timings=timings)
    assert set(timings.seconds) == {"scoring", "similar", "writing"}
    assert all(seconds > 0 for seconds in timings.seconds.values())
