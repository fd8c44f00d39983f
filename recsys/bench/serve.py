"""``recsys bench serve``: latency and throughput of ``GET /users/{id}/recommendations``.

Self-contained and bounded: a small generated shop in its own schema and Redis prefix (configured
servers, else embedded ones in a temporary folder), the pipeline publishes it, the API runs as a
uvicorn subprocess on 127.0.0.1, and everything is removed at the end.

- fixed rate: a constant arrival schedule (request i is due at start + i / rate) from an asyncio
  HTTP/1.1 client over keep-alive connections; latency counts from the due time, not the send
  time, so a stalled server cannot hide its queueing (what wrk2 calls coordinated omission).
- max throughput: ``wrk`` over the same users when installed, else the same Python client in a
  closed loop (the JSON names the client used).
- floor: what each request must do at least, measured with what the project installs: HGETs of
  the same users from the live hash over as many connections, through redis-py's asyncio client
  + hiredis, in a closed loop. Also ``redis-benchmark -t get`` on the same Redis when it is
  installed (Debian's redis-tools); else null, with the reason under ``"unavailable"``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console

from recsys import storage
from recsys.bench.speed import missing_tool
from recsys.core.params import PipelineParams
from recsys.core.settings import Settings
from recsys.local import services
from recsys.local.demo import DemoShop, load_demo
from recsys.pipeline.stages import run_pipeline
from recsys.storage import floors, reads

REQUEST_TIMEOUT_S = 2.0
READY_TIMEOUT_S = 60.0
CONNECTIONS = 64
MAX_DURATION_S = 60
PYTHON_CLIENT = "python-asyncio"  # this module's own HTTP/1.1 client, when wrk is not installed
# the read key of the server this run starts, made for it and sent with every request
BENCH_READ_KEY = secrets.token_urlsafe(32)
console = Console(stderr=True)


@dataclass(frozen=True)
class FixedRate:
    rate: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    requests: int
    achieved_rps: float


@contextmanager
def api_server(settings: Settings, log_path: Path, workers: int) -> Iterator[int]:
    """``recsys serve`` as a subprocess on loopback; terminated on exit."""
    port = services.free_port()
    env = {
        **os.environ,
        "RECSYS_DATABASE_URL": settings.require_database_url,
        "RECSYS_REDIS_URL": settings.require_redis_url,
        "RECSYS_DB_SCHEMA": settings.db_schema,
        "RECSYS_REDIS_PREFIX": settings.redis_prefix,
        "RECSYS_API_KEYS": f"read:{BENCH_READ_KEY}",
    }
    command = [sys.executable, "-m", "recsys", "serve", "--port", str(port), "--workers", str(workers)]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_ready(port, process, log_path)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def _wait_ready(port: int, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"API server exited with {process.returncode}; see {log_path.read_text()[-2000:]}")
        status, _ = asyncio.run(_one_request(port, "/health/ready"))
        if status == 200:
            return
        time.sleep(0.1)
    raise RuntimeError(f"API server not ready after {READY_TIMEOUT_S} s")


async def _one_request(port: int, path: str) -> tuple[int, bytes]:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return 0, b""
    try:
        return await _exchange(reader, writer, path)
    finally:
        writer.close()


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a keep-alive connection; the body is read to the end so the
    connection can be reused."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {BENCH_READ_KEY}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    return status, await reader.readexactly(length)


async def _load(port: int, paths: list[str], rate: int | None, requests: int) -> tuple[np.ndarray, int, float]:
    """Send ``requests`` requests; at ``rate`` per second on a fixed schedule, or as fast as the
    connections allow (None). Returns latencies (s) of successes, the error count, elapsed s."""
    idle: asyncio.Queue = asyncio.Queue()
    for _ in range(CONNECTIONS):
        idle.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()

    async def one(index: int, due: float) -> None:
        nonlocal errors
        connection = await idle.get()
        try:
            status, _ = await asyncio.wait_for(_exchange(*connection, paths[index % len(paths)]), REQUEST_TIMEOUT_S)
            idle.put_nowait(connection)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
            connection[1].close()
            idle.put_nowait(await asyncio.open_connection("127.0.0.1", port))
            errors += 1
            return
        if status == 200:
            latencies.append(time.perf_counter() - due)
        else:
            errors += 1

    tasks = []
    for index in range(requests):
        if rate is None:
            due = time.perf_counter()
        else:
            due = start + index / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index, due)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    while not idle.empty():
        idle.get_nowait()[1].close()
    return np.asarray(latencies), errors, elapsed


def fixed_rate(port: int, paths: list[str], rate: int, seconds: float) -> FixedRate:
    requests = int(rate * seconds)
    latencies, errors, elapsed = asyncio.run(_load(port, paths, rate, requests))
    p50, p99, worst = (np.percentile(latencies, [50, 99, 100]) * 1000).tolist() if len(latencies) else (float("nan"),) * 3
    return FixedRate(rate, round(p50, 3), round(p99, 3), round(worst, 3), errors, requests, round(requests / elapsed, 1))


def max_throughput_wrk(port: int, paths: list[str], seconds: int) -> float:
    """wrk (closed loop, 2 threads, 64 connections) cycling over the users."""
    table = ",".join(json.dumps(path) for path in paths)
    script = f"""local paths = {{{table}}}
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i % #paths) + 1], {{["X-API-Key"] = "{BENCH_READ_KEY}"}})
end
"""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(script)
        lua.flush()
        output = subprocess.run(
            ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{seconds}s", "-s", lua.name, f"http://127.0.0.1:{port}/"],
            capture_output=True, text=True, check=True, timeout=seconds + 30,
        ).stdout
    if "Non-2xx" in output or "Socket errors" in output:
        console.print(f"[yellow]wrk reported errors:[/yellow]\n{output}")
    return float(re.search(r"Requests/sec:\s*([\d.]+)", output).group(1))


def max_throughput_python(port: int, paths: list[str], seconds: int) -> float:
    latencies, errors, elapsed = asyncio.run(_load(port, paths, None, 2_000 * seconds))
    return round(len(latencies) / elapsed, 1)


def redis_py_hget_rps(settings: Settings, users: list[str], seconds: int) -> float:
    """HGETs/s of these users' lists in the live build (each in its bucket) from CONNECTIONS
    concurrent connections of redis-py's asyncio client (hiredis parsing), closed loop for ``seconds``."""
    live = reads.live_build(*storage.connect(settings))
    reads_ = [(live.keys.user_recs(live.name, user), user) for user in users]
    return floors.hget_rate(settings.require_redis_url, reads_, CONNECTIONS, seconds)


def redis_benchmark_get_rps(redis_url: str) -> float:
    url = urllib.parse.urlparse(redis_url)
    command = ["redis-benchmark", "-h", url.hostname or "127.0.0.1", "-p", str(url.port or 6379),
               "-t", "get", "-n", "100000", "-c", "50", "-q"]
    if url.password:
        command += ["-a", urllib.parse.unquote(url.password), "--no-auth-warning"]
    output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout
    return float(re.search(r"GET: ([\d.]+) requests per second", output).group(1))


def _published_users(settings: Settings) -> list[str]:
    return [user for user, _ in reads.live_build(*storage.connect(settings)).entries("user_recs")]


def measure_serving(settings: Settings, users: list[str], rate: int, seconds: int, workers: int, log: Path) -> dict:
    """The API on ``settings``' Redis: fixed-rate latency, max throughput, and the redis-py HGET
    floor of the same users on the same Redis."""
    paths = [f"/users/{urllib.parse.quote(user, safe='')}/recommendations" for user in users]
    with api_server(settings, log, workers) as port:
        # warm-up: connections, the live model load, CPU caches
        fixed_rate(port, paths, min(rate, 500), 1)
        console.print(f"fixed rate {rate}/s for {seconds} s over {len(paths)} users, {workers} workers ...")
        fixed = fixed_rate(port, paths, rate, seconds)
        if wrk_missing := missing_tool("wrk", "Debian: wrk"):
            console.print(f"{wrk_missing}: max throughput from the Python asyncio client")
            max_rps, client = max_throughput_python(port, paths, seconds), PYTHON_CLIENT
        else:
            console.print(f"max throughput: wrk -t2 -c{CONNECTIONS} for {seconds} s ...")
            max_rps, client = max_throughput_wrk(port, paths, seconds), "wrk"
    console.print(f"floor: redis-py HGET over {CONNECTIONS} connections for {seconds} s ...")
    floor = redis_py_hget_rps(settings, users, seconds)
    console.print(
        f"fixed {fixed.rate}/s: p50 {fixed.p50_ms} ms, p99 {fixed.p99_ms} ms, max {fixed.max_ms} ms, {fixed.errors} "
        f"errors ({fixed.requests} requests, {fixed.achieved_rps}/s achieved); max {max_rps} req/s ({client}); "
        f"redis-py HGET {floor} req/s"
    )
    return {
        "fixed_rate": {"rate": fixed.rate, "p50_ms": fixed.p50_ms, "p99_ms": fixed.p99_ms, "max_ms": fixed.max_ms,
                       "errors": fixed.errors},
        "max_rps": max_rps,
        "max_rps_client": client,
        "redis_py_hget_rps": floor,
    }


def serve_bench_command(
    json_output: Annotated[bool, typer.Option("--json", help="end stdout with one JSON object")] = False,
    rate: Annotated[int, typer.Option(min=1, max=20_000, help="fixed arrival rate, requests/s")] = 1_000,
    seconds: Annotated[int, typer.Option(min=1, max=MAX_DURATION_S, help="length of each load phase")] = 10,
    users: Annotated[int, typer.Option(min=100, max=100_000, help="demo shop users")] = 2_000,
    products: Annotated[int, typer.Option(min=50, max=20_000, help="demo shop products")] = 500,
    workers: Annotated[int, typer.Option(min=1, max=16, help="API server processes")] = 2,
    cluster: Annotated[
        bool, typer.Option("--cluster", help="measure again on a local Redis Cluster (3 masters, a replica each)")
    ] = False,
) -> None:
    """Load-test GET /users/{id}/recommendations on loopback: p50/p99/max at a fixed rate, max
    requests/s, and as the floor redis-py HGETs of the same users (and redis-benchmark GET when
    installed) on the same Redis; with --cluster the same on a local 3-master cluster, published
    from the same run."""
    with services.isolated("bench-serve") as settings, tempfile.TemporaryDirectory(prefix="recsys-bench-log-") as logs:
        end = datetime.now(UTC).replace(microsecond=0)
        console.print(f"demo shop: {users} users, {products} products; pipeline ...")
        load_demo(settings, DemoShop(users=users, products=products, days=60), end=end)
        result = run_pipeline(settings, end, PipelineParams())
        published = _published_users(settings)
        figures = measure_serving(settings, published, rate, seconds, workers, Path(logs) / "api.log")
        figures["unavailable"] = {}
        if reason := missing_tool("redis-benchmark", "Debian: redis-tools"):
            figures["redis_get_rps"], figures["unavailable"]["redis_get_rps"] = None, reason
        else:
            figures["redis_get_rps"] = redis_benchmark_get_rps(settings.require_redis_url)
        if cluster:
            from recsys.local.cluster import LocalCluster
            from recsys.pipeline.stages import publish_stage

            console.print("the same run published on a local Redis Cluster (3 masters with a replica each) ...")
            with LocalCluster(masters=3, replicas=1) as local:
                on_cluster = settings.model_copy(update={"redis_url": local.url})
                publish_stage(on_cluster, result.run)
                figures["cluster"] = {
                    "masters": 3, "replicas_per_master": 1,
                    **measure_serving(on_cluster, published, rate, seconds, workers, Path(logs) / "api-cluster.log"),
                }
    if json_output:
        sys.stdout.write(json.dumps(figures) + "\n")
