"""``recsys bench serve`` at a small size, on a machine with only Python and the requirements."""

from __future__ import annotations

import re
import shutil

import psycopg
import pytest
from helpers import run_recsys_json

from recsys.bench.serve import PYTHON_CLIENT, redis_benchmark_get_rps


def test_serve_bench_without_wrk_or_redis_benchmark(service_urls, bare_path):
    import redis

    client = redis.Redis.from_url(service_urls.redis_url)
    before = set(client.scan_iter(match="*bench_serve_*", count=1000))
    result = run_recsys_json(
        ["bench", "serve", "--json", "--rate", "200", "--seconds", "1", "--users", "150", "--products", "60",
         "--workers", "1", "--runs", "1"],
        service_urls, bare_path,
    )
    fixed = result["fixed_rate"]
    assert 0 < fixed["p50_ms"] <= fixed["p99_ms"] <= fixed["p999_ms"] <= fixed["max_ms"]  # NaN when nothing succeeded
    assert fixed["errors"] == 0
    assert result["max_rps_client"] == PYTHON_CLIENT and result["max_rps"] > 0
    assert result["redis_py_hget_rps"] > 0
    # every endpoint next to its own floor, measured in the same run
    assert set(result["endpoints"]) == {"users", "similar", "cart"}
    for endpoint in result["endpoints"].values():
        assert endpoint["floor_rps"] > 0 and endpoint["max_rps"] > 0
        assert endpoint["ratio_to_floor"] == round(endpoint["max_rps"] / endpoint["floor_rps"], 4)
        assert endpoint["fixed_rate"]["errors"] == 0
        # the floor's latency at the same rates, beside the API's
        assert [f["rate"] for f in endpoint["floor_fixed_rates"]] == [f["rate"] for f in endpoint["fixed_rates"]] == [200]
        floor = endpoint["floor_fixed_rates"][0]
        assert floor["errors"] == 0 and 0 < floor["p50_ms"] <= floor["p99_ms"] <= floor["max_ms"]
    assert result["ratio_to_floor"] == result["endpoints"]["users"]["ratio_to_floor"]
    assert result["redis_get_rps"] is None
    assert "redis-benchmark not on PATH" in result["unavailable"]["redis_get_rps"]
    # nothing of this run is left: a key new since the start belongs to a run still going (its
    # schema, named as its key prefix, still there: another bench serve on the same servers)
    new = set(client.scan_iter(match="*bench_serve_*", count=1000)) - before
    tags = {re.search(rb"bench_serve_(?:cpu_)?[0-9a-f]{8}", key).group().decode() for key in new}
    with psycopg.connect(service_urls.database_url) as conn:
        running = {name for (name,) in conn.execute(
            "SELECT schema_name FROM information_schema.schemata WHERE schema_name = ANY(%s)", (list(tags),))}
    assert tags == running, f"keys left by a finished bench serve: {sorted(tags - running)}"


@pytest.mark.skipif(shutil.which("redis-benchmark") is None, reason="redis-benchmark (Debian: redis-tools) not installed")
def test_redis_benchmark_get_floor_when_it_is_installed(service_urls):
    assert redis_benchmark_get_rps(service_urls.redis_url) > 0


def test_serve_cpu_bench_drives_the_api_and_the_floor_in_process(service_urls, bare_path):
    result = run_recsys_json(
        ["bench", "serve-cpu", "--json", "--requests", "100", "--repeat", "2", "--users", "150", "--products", "60",
         "--experiment"],
        service_urls, bare_path,
    )
    # --experiment: GET /users measured again with every user enrolled (the answers name variants)
    assert set(result["endpoints"]) == {"users", "similar", "cart", "users_enrolled"}
    assert isinstance(result["experiment_cost"], float) and result["enrolled_users"] > 100
    for endpoint in result["endpoints"].values():
        assert endpoint["not_ok"] == 0  # every request answered 200 by both apps
        assert len(endpoint["runs"]["api_us"]) == len(endpoint["runs"]["floor_us"]) == 2
        assert 0 < endpoint["api_us"]["min"] <= endpoint["api_us"]["median"] <= endpoint["api_us"]["max"]
        assert endpoint["floor_us"]["min"] > 0 and endpoint["cpu_ratio"]["median"] > 0
