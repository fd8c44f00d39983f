"""``recsys bench speed`` at a small size, and the O(events) demo generator behind it."""

from __future__ import annotations

import json
import math
import tracemalloc

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from recsys.bench_speed import RATIOS, speed_bench_command
from recsys.demo import DemoShop, generate_interactions


@pytest.fixture
def bench_env(service_urls, monkeypatch):
    """The bench makes (and removes) its own schema and prefix on the test servers."""
    monkeypatch.setenv("RECSYS_DATABASE_URL", service_urls.database_url)
    monkeypatch.setenv("RECSYS_REDIS_URL", service_urls.redis_url)
    return service_urls


def test_speed_bench_reports_every_stage_and_ratio(bench_env):
    import redis

    client = redis.Redis.from_url(bench_env.redis_url)
    before = set(client.scan_iter(match="bench-speed-*", count=1000))
    app = typer.Typer()
    app.command()(speed_bench_command)
    result = CliRunner().invoke(
        app,
        ["--users", "2000", "--items", "300", "--interactions", "50000", "--spark-interactions", "0",
         "--scoring-users", "2000", "--json"],
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for stage, key in RATIOS:
        value = figures[stage][key]
        if (stage, key) == ("train", "speedup_vs_spark"):
            assert value is None  # Spark skipped
            continue
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (stage, key, value)
    assert figures["extract"]["rows"] == figures["load"]["rows"] > 40_000
    assert figures["matrix"]["users"] == 2000
    assert figures["publish"]["users"] > 1900
    publish = figures["publish"]
    assert 0 < publish["write_seconds"] < publish["seconds"] and publish["scoring_seconds"] > 0
    assert publish["plain_keys_bytes_per_user"] > publish["raw_payload_bytes_per_user"] > 0
    # own schema and prefix are gone again
    assert set(client.scan_iter(match="bench-speed-*", count=1000)) == before


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
