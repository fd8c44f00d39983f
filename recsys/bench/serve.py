"""``recsys bench serve``: latency and throughput of the API's three busiest requests, each
next to its floor measured in the same run.

Self-contained and bounded: a small generated shop in its own schema and Redis prefix (configured
servers, else embedded ones in a temporary folder), the pipeline publishes it, the API runs as a
uvicorn subprocess on 127.0.0.1, and everything is removed at the end.

- endpoints: ``GET /users/{id}/recommendations`` (users cycled over the published ones),
  ``GET /products/{id}/similar`` (products cycled) and ``POST /carts/recommendations`` (carts of
  2-3 products).
- floor: a bare ASGI app (``recsys.bench.floor_app``, no framework) answering the same three
  requests with the stored entries read in one Redis round trip, on the same server software,
  worker count and Redis, loaded by the same client. ``ratio_to_floor`` = the API's max req/s /
  the floor's, per endpoint; the two are measured alternately, ``--runs`` times, and the median
  and the spread (min, max) reported.
- fixed rate: a constant arrival schedule (request i is due at start + i / rate) from an asyncio
  HTTP/1.1 client over keep-alive connections; latency counts from the due time, not the send
  time, so a stalled server cannot hide its queueing (what wrk2 calls coordinated omission):
  p50/p99/p99.9/max, per endpoint, at each ``--rate``.
- max throughput: the same client in a closed loop over CONNECTIONS connections (``wrk`` is
  used for GET /users when installed, reported as ``max_rps_wrk``: it needs no Python).
- Redis floors as before: HGETs of the same users through redis-py's asyncio client, and
  ``redis-benchmark -t get`` on the same Redis when it is installed (else null, with the reason).

The client runs on the same cores as the servers: absolute numbers are this machine's; the ratios
are what compares.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
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
    p999_ms: float
    max_ms: float
    errors: int
    requests: int
    achieved_rps: float


@contextmanager
def api_server(
    settings: Settings, log_path: Path, workers: int, more_env: dict[str, str] | None = None
) -> Iterator[int]:
    """``recsys serve`` as a subprocess on loopback (``more_env``: more RECSYS_* settings);
    terminated on exit."""
    env = {
        "RECSYS_DATABASE_URL": settings.require_database_url,
        "RECSYS_REDIS_URL": settings.require_redis_url,
        "RECSYS_DB_SCHEMA": settings.db_schema,
        "RECSYS_REDIS_PREFIX": settings.redis_prefix,
        "RECSYS_API_KEYS": f"read:{BENCH_READ_KEY}",
        **(more_env or {}),
    }
    with _server(lambda port: ["-m", "recsys", "serve", "--port", str(port), "--workers", str(workers)], env, log_path,
                 "/health/ready") as port:
        yield port


@contextmanager
def _server(arguments: Callable[[int], list[str]], env: dict[str, str], log_path: Path, ready: str) -> Iterator[int]:
    """A Python server subprocess on a free loopback port, answering ``ready`` before it is
    used; terminated on exit."""
    port = services.free_port()
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, *arguments(port)], env={**os.environ, **env}, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        _wait_ready(port, process, log_path, ready)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def _wait_ready(port: int, process: subprocess.Popen, log_path: Path, path: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}; see {log_path.read_text()[-2000:]}")
        status, _ = asyncio.run(_one_request(port, path))
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
        return await exchange(reader, writer, http_request("GET", path))
    finally:
        writer.close()


def http_request(method: str, path: str, body: bytes = b"", key: str = BENCH_READ_KEY) -> bytes:
    """One HTTP/1.1 request, ready to send (built once, before a load phase)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {key}\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a keep-alive connection; the body is read to the end so the
    connection can be reused."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    return status, await reader.readexactly(length)


async def _load(port: int, paths: list[bytes], rate: int | None, requests: int) -> tuple[np.ndarray, int, float]:
    """Send ``requests`` requests (cycling over the prepared ``paths``: whole HTTP requests); at
    ``rate`` per second on a fixed schedule, or as fast as the connections allow (None). Returns
    latencies (s) of successes, the error count, elapsed s."""
    idle: asyncio.Queue = asyncio.Queue()
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CONNECTIONS)]
    # one request on each connection first: the servers accept and set up a connection when its
    # first request comes, and 64 of them at once would stall the first ~100 ms of the schedule
    await asyncio.gather(*(exchange(*connection, paths[0]) for connection in connections))
    for connection in connections:
        idle.put_nowait(connection)
    latencies: list[float] = []
    errors = 0

    async def one(index: int, due: float) -> None:
        nonlocal errors
        connection = await idle.get()
        try:
            status, _ = await asyncio.wait_for(exchange(*connection, paths[index % len(paths)]), REQUEST_TIMEOUT_S)
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

    # no cyclic GC while loading: a full collection over thousands of pending tasks stalls the
    # client for tens of ms, which would be charged to the server; the set keeps pending tasks
    # alive (the loop holds only weak references) and lets finished ones go
    pending: set[asyncio.Task] = set()
    gc.collect()
    gc.disable()
    start = time.perf_counter()
    try:
        for index in range(requests):
            if rate is None:
                due = time.perf_counter()
            else:
                due = start + index / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            task = asyncio.create_task(one(index, due))
            pending.add(task)
            task.add_done_callback(pending.discard)
        while pending:
            await asyncio.wait(pending)
    finally:
        gc.enable()
    elapsed = time.perf_counter() - start
    while not idle.empty():
        idle.get_nowait()[1].close()
    return np.asarray(latencies), errors, elapsed


def _run(coroutine):
    """The bench's client on uvloop (as the servers), whose own per-request cost is lower."""
    import uvloop

    return uvloop.run(coroutine)


def fixed_rate(port: int, paths: list[bytes], rate: int, seconds: float) -> FixedRate:
    requests = int(rate * seconds)
    latencies, errors, elapsed = _run(_load(port, paths, rate, requests))
    if len(latencies):
        p50, p99, p999, worst = (np.percentile(latencies, [50, 99, 99.9, 100]) * 1000).tolist()
    else:
        p50 = p99 = p999 = worst = float("nan")
    return FixedRate(rate, round(p50, 3), round(p99, 3), round(p999, 3), round(worst, 3), errors, requests,
                     round(requests / elapsed, 1))


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


def max_throughput_python(port: int, paths: list[bytes], seconds: int) -> float:
    latencies, errors, elapsed = _run(_load(port, paths, None, 2_000 * seconds))
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


def published_users(settings: Settings) -> list[str]:
    return [user for user, _ in reads.live_build(*storage.connect(settings)).entries("user_recs")]


@contextmanager
def floor_server(settings: Settings, log_path: Path, workers: int) -> Iterator[int]:
    """``recsys.bench.floor_app`` under uvicorn as a subprocess, as ``recsys serve`` runs the API."""
    env = {"RECSYS_REDIS_URL": settings.require_redis_url, "RECSYS_REDIS_PREFIX": settings.redis_prefix}

    def arguments(port: int) -> list[str]:
        return ["-m", "uvicorn", "recsys.bench.floor_app:create_app", "--factory", "--host", "127.0.0.1",
                "--port", str(port), "--workers", str(workers), "--no-access-log", "--log-level", "warning",
                "--loop", "uvloop", "--http", "httptools"]

    with _server(arguments, env, log_path, "/users/0/recommendations") as port:
        yield port


@dataclass(frozen=True)
class Endpoint:
    name: str
    requests: list[bytes]  # whole HTTP requests, cycled over


def request_mix(settings: Settings) -> dict[str, list[tuple[str, str, bytes]]]:
    """The three requests (method, path, body), over the published users and products (carts of
    2-3 products)."""
    live = reads.live_build(*storage.connect(settings))
    users = [user for user, _ in live.entries("user_recs")]
    products = [product for product, _ in live.entries("similar_products")]
    carts = [json.dumps({"product_ids": [products[i], products[(i * 7 + 1) % len(products)],
                                         *([products[(i * 13 + 2) % len(products)]] if i % 2 else [])]}).encode()
             for i in range(min(len(products), 500))]
    quote = lambda value: urllib.parse.quote(value, safe="")  # noqa: E731
    return {
        "users": [("GET", f"/users/{quote(user)}/recommendations", b"") for user in users],
        "similar": [("GET", f"/products/{quote(product)}/similar", b"") for product in products],
        "cart": [("POST", "/carts/recommendations", cart) for cart in carts],
    }


def endpoints(settings: Settings) -> list[Endpoint]:
    return [Endpoint(name, [http_request(*request) for request in requests]) for name, requests in request_mix(settings).items()]


def _spread(values: list[float]) -> dict:
    return {"median": round(float(np.median(values)), 4), "min": min(values), "max": max(values)}


def measure_endpoints(
    settings: Settings, rates: list[int], seconds: int, workers: int, runs: int, logs: Path
) -> dict[str, dict]:
    """Per endpoint: the API's and the floor's max req/s measured alternately ``runs`` times, their
    ratio, and the API's latency at each fixed rate."""
    found = {}
    with api_server(settings, logs / "api.log", workers) as api, floor_server(settings, logs / "floor.log", workers) as floor:
        for endpoint in endpoints(settings):
            for port in (api, floor):  # warm-up: connections, the live model load, CPU caches
                fixed_rate(port, endpoint.requests, 500, 1)
            api_rps, floor_rps = [], []
            for run in range(runs):
                console.print(f"{endpoint.name}: max throughput, API and floor, run {run + 1}/{runs} ...")
                api_rps.append(max_throughput_python(api, endpoint.requests, seconds))
                floor_rps.append(max_throughput_python(floor, endpoint.requests, seconds))
            ratios = [round(a / f, 4) for a, f in zip(api_rps, floor_rps, strict=True)]
            entry = {
                "max_rps": _spread(api_rps)["median"], "max_rps_client": PYTHON_CLIENT,
                "floor_rps": _spread(floor_rps)["median"], "ratio_to_floor": _spread(ratios)["median"],
                "runs": {"api_rps": api_rps, "floor_rps": floor_rps, "ratio_to_floor": ratios},
                "spread": {"api_rps": _spread(api_rps), "floor_rps": _spread(floor_rps), "ratio_to_floor": _spread(ratios)},
                "fixed_rates": [], "floor_fixed_rates": [],
            }
            for rate in rates:
                console.print(f"{endpoint.name}: fixed rate {rate}/s for {seconds} s, {workers} workers ...")
                entry["fixed_rates"].append(_latencies(fixed_rate(api, endpoint.requests, rate, seconds)))
                # the floor at the same rate: the tail this machine, client and Redis give anyway
                entry["floor_fixed_rates"].append(_latencies(fixed_rate(floor, endpoint.requests, rate, seconds)))
            entry["fixed_rate"] = entry["fixed_rates"][0]
            console.print(f"{endpoint.name}: API {entry['max_rps']} req/s, floor {entry['floor_rps']} req/s, "
                          f"ratio {entry['ratio_to_floor']} (runs {ratios}); fixed {entry['fixed_rates']}; "
                          f"floor fixed {entry['floor_fixed_rates']}")
            found[endpoint.name] = entry
        if not missing_tool("wrk", "Debian: wrk"):
            found["users"]["max_rps_wrk"] = max_throughput_wrk(api, _user_paths(settings), seconds)
    return found


def _latencies(fixed: FixedRate) -> dict:
    return {key: value for key, value in asdict(fixed).items() if key != "requests"}


def _user_paths(settings: Settings) -> list[str]:
    return [f"/users/{urllib.parse.quote(user, safe='')}/recommendations" for user in published_users(settings)]


def measure_serving(settings: Settings, rates: list[int], seconds: int, workers: int, runs: int, logs: Path) -> dict:
    """Every endpoint next to its floor, and the Redis floors, on ``settings``' Redis; the
    top-level keys are the users endpoint's (as before there were others)."""
    per_endpoint = measure_endpoints(settings, rates, seconds, workers, runs, logs)
    console.print(f"Redis floor: redis-py HGET over {CONNECTIONS} connections for {seconds} s ...")
    users = per_endpoint["users"]
    return {
        "fixed_rate": users["fixed_rate"],
        "max_rps": users["max_rps"],
        "max_rps_client": users["max_rps_client"],
        "floor_rps": users["floor_rps"],
        "ratio_to_floor": users["ratio_to_floor"],
        "redis_py_hget_rps": redis_py_hget_rps(settings, published_users(settings), seconds),
        "endpoints": per_endpoint,
    }


def serve_bench_command(
    json_output: Annotated[bool, typer.Option("--json", help="end stdout with one JSON object")] = False,
    rate: Annotated[
        list[int] | None, typer.Option(min=1, max=20_000, help="fixed arrival rate, requests/s (repeatable)")
    ] = None,
    seconds: Annotated[int, typer.Option(min=1, max=MAX_DURATION_S, help="length of each load phase")] = 10,
    users: Annotated[int, typer.Option(min=100, max=100_000, help="demo shop users")] = 2_000,
    products: Annotated[int, typer.Option(min=50, max=20_000, help="demo shop products")] = 500,
    workers: Annotated[int, typer.Option(min=1, max=16, help="API server processes (and the floor's)")] = 2,
    runs: Annotated[int, typer.Option(min=1, max=9, help="alternate API and floor measurements per endpoint")] = 3,
    cluster: Annotated[
        bool, typer.Option("--cluster", help="measure again on a local Redis Cluster (3 masters, a replica each)")
    ] = False,
) -> None:
    """Load-test the API's three busiest requests on loopback, each next to a bare ASGI floor doing
    the same Redis read on the same server software: max requests/s (``ratio_to_floor``), and
    p50/p99/p99.9 at fixed rates (default 1000 and 2000/s); with --cluster the same on a local
    3-master cluster, published from the same run."""
    rates = rate or [1_000, 2_000]
    with services.isolated("bench-serve") as settings, tempfile.TemporaryDirectory(prefix="recsys-bench-log-") as logs:
        end = datetime.now(UTC).replace(microsecond=0)
        console.print(f"demo shop: {users} users, {products} products; pipeline ...")
        load_demo(settings, DemoShop(users=users, products=products, days=60), end=end)
        result = run_pipeline(settings, end, PipelineParams())
        figures = measure_serving(settings, rates, seconds, workers, runs, Path(logs))
        figures["redis"] = "single"
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
                cluster_logs = Path(logs) / "cluster"
                cluster_logs.mkdir()
                figures["cluster"] = {
                    "masters": 3, "replicas_per_master": 1,
                    **measure_serving(on_cluster, rates, seconds, workers, runs, cluster_logs),
                }
    if json_output:
        sys.stdout.write(json.dumps(figures) + "\n")
