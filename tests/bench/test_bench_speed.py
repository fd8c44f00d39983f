"""``recsys bench speed`` at a small size, and the O(events) demo generator behind it."""

from __future__ import annotations

import math
import re
import shutil
import tracemalloc

import numpy as np
import pytest
from helpers import run_recsys_json

from recsys.bench.speed import (
    OPTIONAL_RATIOS,
    RATIOS,
    missing_tool,
    redis_benchmark_set_rps,
    redis_py_write_floor,
)
from recsys.local.demo import DemoShop, generate_interactions
from recsys.storage import connect


def _bench_keys(client, label: str) -> set:
    return set(client.scan_iter(match=f"*{label}_*", count=1000))


def test_speed_bench_on_a_machine_with_only_python(service_urls, bare_path):
    """No redis-benchmark, no Java: every ratio the project can measure itself is a number, the
    others are null with the reason."""
    import redis

    client = redis.Redis.from_url(service_urls.redis_url)
    before = _bench_keys(client, "bench_speed")
    figures = run_recsys_json(
        ["bench", "speed", "--users", "2000", "--items", "300", "--interactions", "50000",
         "--spark-interactions", "1000", "--scoring-users", "2000", "--json"],
        service_urls, bare_path,
    )
    for stage, key in RATIOS:
        value = figures[stage][key]
        if (stage, key) in OPTIONAL_RATIOS:
            assert value is None, (stage, key, value)
            continue
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (stage, key, value)
    publish, train = figures["publish"], figures["train"]
    assert "redis-benchmark not on PATH" in publish["unavailable"]["ratio_to_redis_benchmark"]
    assert publish["redis_benchmark_set_rps"] is None
    # with pyspark installed it is Java that is missing here; without it, pyspark
    assert re.search(r"java not on PATH|pyspark not installed", train["unavailable"]["speedup_vs_spark"])
    floor = publish["redis_py_write_floor"]
    assert floor["fields"] >= 100_000 and floor["fields_per_s"] > 0 and floor["value_bytes"] > 10
    assert figures["extract"]["rows"] == figures["load"]["rows"] > 40_000
    assert figures["matrix"]["users"] == 2000
    assert publish["users"] > 1900
    assert 0 < publish["write_seconds"] < publish["seconds"] and publish["scoring_seconds"] > 0
    scoring = figures["scoring"]
    assert scoring["diversity_lambda"] > 0 and scoring["top_n"] == 10  # publish's scoring with its defaults
    assert scoring["sgemm_only_users_per_s"] == max(scoring["sgemm_blocks_users_per_s"], scoring["sgemm_tiles_users_per_s"])
    assert publish["plain_keys_bytes_per_user"] > publish["raw_payload_bytes_per_user"] > 0
    # approximate top-N vs exact on the same holdout users: 300 products, the graph finds them all
    ann = figures["ann"]
    assert ann["library"] == "faiss" and ann["items"] == figures["matrix"]["items"] and ann["users"] > 100
    assert ann["recall_at_10"] >= 0.99 and ann["map_exact"] > 0 and abs(ann["map_delta"]) <= 0.01
    assert ann["speedup_min"] <= ann["speedup"] <= ann["speedup_max"] and ann["build_seconds"] >= 0
    # every family's cost, each measured on the same shop (300 products: EASE and item-kNN fit)
    families = figures["families"]
    assert families["scoring_users"] == 2000
    for family in ("als", "bpr", "item_knn", "ease", "mult_dae", "blend"):
        cost = families[family]
        assert cost["fit_seconds"] > 0 and cost["scoring_users_per_s"] > 0 and cost["peak_rss_bytes"] > 0, family
    assert families["als"]["params"]["factors"] == figures["config"]["factors"]
    # own schema and prefix are gone again, the floor's scratch hash with them
    assert _bench_keys(client, "bench_speed") == before


def test_write_floor_counts_its_fields_and_removes_its_hash(settings):
    rate = redis_py_write_floor(settings, value_bytes=50, fields=25_000)
    assert rate > 0
    client, keys = connect(settings)
    assert not any(client.exists(f"{tag}:bench-write-floor") for tag in keys.bucket_tags)


@pytest.mark.skipif(shutil.which("redis-benchmark") is None, reason="redis-benchmark (Debian: redis-tools) not installed")
def test_redis_benchmark_floors_when_it_is_installed(settings):
    assert redis_benchmark_set_rps(settings.redis_url, 100, 20_000) > 0
    assert missing_tool("redis-benchmark", "Debian: redis-tools") is None


def test_generator_is_deterministic_by_seed(window_end):
    shop = DemoShop(users=3_000, products=5_000, interactions=60_000, seed=11)
    first = [frame for _, frame in generate_interactions(shop, window_end)]
    again = [frame for _, frame in generate_interactions(shop, window_end)]
    assert all(a.equals(b) for a, b in zip(first, again, strict=True))
    other = next(generate_interactions(DemoShop(users=3_000, products=5_000, interactions=60_000, seed=12), window_end))[1]
    assert not first[0].equals(other)


def test_interaction_count_and_power_law_popularity(window_end):
    shop = DemoShop(users=20_000, products=20_000, interactions=400_000, seed=5)
    frames = [frame for _, frame in generate_interactions(shop, window_end)]
    rows = sum(len(frame) for frame in frames)
    assert 0.8 * 400_000 < rows < 1.2 * 400_000
    products = np.concatenate([frame["product_id"].to_numpy() for frame in frames])
    counts = np.sort(np.bincount(products))[::-1]
    counts = counts[counts > 0]
    # a heavy head and a long tail: top 1 % of products take far more than 1 % of events
    assert counts[: len(counts) // 100].sum() / counts.sum() > 0.15
    # log-log slope of count vs rank over the head is about -1 (Zipf), not flat
    ranks = np.arange(1, 1_001)
    slope = np.polyfit(np.log(ranks[10:]), np.log(counts[10:1_000]), 1)[0]
    assert -1.6 < slope < -0.5
    # per-user counts are skewed (log-normal visits): the heaviest users do many times the median
    per_user = np.bincount(np.concatenate([frame["user_id"].to_numpy() for frame in frames]))[1:]
    assert per_user.max() > 10 * np.median(per_user)


def test_large_catalogue_never_builds_a_users_x_products_array(window_end):
    """200k products x 20k users would be 32 GB as a dense float64 matrix; the generator's peak
    allocation stays far below even one users-block x products array."""
    shop = DemoShop(users=20_000, products=200_000, interactions=200_000, seed=1)
    tracemalloc.start()
    try:
        rows = sum(len(frame) for _, frame in generate_interactions(shop, window_end))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows > 100_000
    dense_block = 2_000 * shop.products * 8  # the smallest block the old generator used, float64
    assert peak < dense_block / 4, peak
