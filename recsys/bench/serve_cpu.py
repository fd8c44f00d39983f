"""``recsys bench serve-cpu``: the CPU one request of each of the API's three busiest kinds costs
in the API process, next to the floor app doing the same Redis read, without an HTTP server.

``recsys bench serve`` measures whole servers over loopback, where the client, four server
processes and Redis share the cores and identical runs differ by ±0.15 in their ratio. Here both
ASGI apps (``recsys.serving.api`` behind its hot paths, ``recsys.bench.floor_app``) run in this
one process, on uvloop, driven request by request through the ASGI interface over the same
published shop and the same request mix as ``bench serve``; the process CPU time of ``--requests``
requests (Redis' own CPU is another process's) is divided by their count. API and floor
alternate ``--repeat`` times; reported per endpoint: µs per request (median, min, max) and
``cpu_ratio`` = floor µs / API µs (median of the repeats: what the API would reach of the floor's
req/s if the server's own per-request cost were nil). ``--profile`` prints the top entries of a
cProfile of one more pass of the API over each endpoint.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import json
import pstats
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated

import numpy as np
import typer
from rich.console import Console

from recsys.bench.serve import BENCH_READ_KEY, request_mix
from recsys.core.params import PipelineParams
from recsys.core.settings import Settings
from recsys.local import services
from recsys.local.demo import DemoShop, load_demo
from recsys.pipeline.stages import run_pipeline

console = Console(stderr=True)
PROFILE_LINES = 25


@asynccontextmanager
async def running(app) -> AsyncIterator[None]:
    """The app between its lifespan's startup and shutdown, as a server runs it."""
    inbox: asyncio.Queue = asyncio.Queue()
    outbox: asyncio.Queue = asyncio.Queue()
    inbox.put_nowait({"type": "lifespan.startup"})
    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, outbox.put))
    started = await outbox.get()
    if started["type"] != "lifespan.startup.complete":
        raise RuntimeError(f"the app did not start: {started}")
    try:
        yield
    finally:
        inbox.put_nowait({"type": "lifespan.shutdown"})
        await outbox.get()
        await task


def _scope(method: str, path: str, body: bytes) -> dict:
    headers = [(b"host", b"127.0.0.1"), (b"x-api-key", BENCH_READ_KEY.encode())]
    if body:
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    path, _, query = path.partition("?")
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
        "headers": headers, "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    }


async def drive(app, requests: list[tuple[str, str, bytes]], count: int) -> tuple[float, int]:
    """``count`` requests (cycling over ``requests``) one after another; the process CPU seconds
    they took and how many were not answered 200."""
    scopes = [(_scope(method, path, body), body) for method, path, body in requests]
    failed = 0
    start = time.process_time()
    for index in range(count):
        scope, body = scopes[index % len(scopes)]
        status = 0

        async def receive(body=body) -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await app(dict(scope), receive, send)
        failed += status != 200
    return time.process_time() - start, failed


def _spread(values: list[float]) -> dict:
    return {"median": round(float(np.median(values)), 2), "min": round(min(values), 2), "max": round(max(values), 2)}


async def measure(settings: Settings, count: int, repeat: int, profile: bool, only: str | None = None) -> dict:
    # imported here: the CLI's start-up does not pay for FastAPI
    from recsys.bench.floor_app import create_app as create_floor_app
    from recsys.serving.api import create_api

    api = create_api(settings.model_copy(update={"api_keys": f"read:{BENCH_READ_KEY}"}))
    floor = create_floor_app(settings)
    found = {}
    async with running(api), running(floor):
        for name, requests in request_mix(settings).items():
            if only is not None and name != only:
                continue
            for app in (api, floor):  # warm-up: the live model load, connections, caches
                await drive(app, requests, min(count, 500))
            api_us, floor_us, failed = [], [], 0
            for _ in range(repeat):
                for app, times in ((api, api_us), (floor, floor_us)):
                    seconds, not_ok = await drive(app, requests, count)
                    times.append(seconds / count * 1e6)
                    failed += not_ok
            ratios = [f / a for a, f in zip(api_us, floor_us, strict=True)]
            found[name] = {
                "api_us": _spread(api_us), "floor_us": _spread(floor_us), "cpu_ratio": _spread(ratios),
                "runs": {"api_us": [round(t, 2) for t in api_us], "floor_us": [round(t, 2) for t in floor_us]},
                "not_ok": failed,
            }
            console.print(f"{name}: API {found[name]['api_us']} µs, floor {found[name]['floor_us']} µs, "
                          f"ratio {found[name]['cpu_ratio']}, not 200: {failed}")
            if profile:
                profiler = cProfile.Profile(time.process_time)  # CPU, not the waits for Redis
                profiler.enable()
                await drive(api, requests, count)
                profiler.disable()
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(PROFILE_LINES)
                console.print(f"cProfile of the API, {name}, {count} requests, by own time:\n{text.getvalue()}",
                              markup=False, highlight=False)
    return found


def enroll_everyone(settings: Settings, run) -> int:
    """An A/A experiment over every user (50/50), served by a new train and publish of ``run``;
    the users it enrolled, as the published version's meta counts them."""
    from recsys import storage
    from recsys.core import experiments
    from recsys.core.experiments import Experiment, Variant
    from recsys.pipeline.stages import publish_stage, train_stage
    from recsys.storage.live import MAX_POINTER_AGE_SECONDS

    experiments.start_experiment(settings, Experiment(
        name="bench-serve-cpu", variants=(Variant("control", 0.5), Variant("treatment", 0.5)),
    ))
    train_stage(settings, run)
    publish_stage(settings, run)
    time.sleep(MAX_POINTER_AGE_SECONDS)  # no cached pointer to the version before
    meta = storage.reads.live_build(*storage.connect(settings)).meta()
    return sum(meta["experiment"]["enrolled_users"].values())


def serve_cpu_command(
    json_output: Annotated[bool, typer.Option("--json", help="end stdout with one JSON object")] = False,
    requests: Annotated[int, typer.Option(min=100, max=100_000, help="requests per measurement")] = 3_000,
    repeat: Annotated[int, typer.Option(min=1, max=20, help="alternate API and floor measurements per endpoint")] = 5,
    users: Annotated[int, typer.Option(min=100, max=100_000, help="demo shop users")] = 2_000,
    products: Annotated[int, typer.Option(min=50, max=20_000, help="demo shop products")] = 500,
    profile: Annotated[bool, typer.Option("--profile", help="print a cProfile of the API per endpoint")] = False,
    experiment: Annotated[bool, typer.Option(
        "--experiment", help="then publish again with every user in an A/A experiment and measure GET /users again "
        "(answers name the variant, exposures are logged): endpoint users_enrolled and experiment_cost")] = False,
) -> None:
    """CPU µs per request of the API's three busiest requests in process (no HTTP server), next to
    the bare ASGI floor doing the same Redis read: the less noisy companion of ``bench serve``."""
    import uvloop

    with services.isolated("bench-serve-cpu") as settings:
        end = datetime.now(UTC).replace(microsecond=0)
        console.print(f"demo shop: {users} users, {products} products; pipeline ...")
        load_demo(settings, DemoShop(users=users, products=products, days=60), end=end)
        run = run_pipeline(settings, end, PipelineParams()).run
        figures = {"requests": requests, "repeat": repeat,
                   "endpoints": uvloop.run(measure(settings, requests, repeat, profile))}
        if experiment:
            console.print("every user in an A/A experiment; train and publish again ...")
            figures["enrolled_users"] = enroll_everyone(settings, run)
            enrolled = uvloop.run(measure(settings, requests, repeat, profile, only="users"))["users"]
            figures["endpoints"]["users_enrolled"] = enrolled
            # the API's CPU per request with the variant fields and the exposure log (its flushes
            # included), each measured per floor request of the same moment: the machine's drift
            # between the two measurements cancels
            figures["experiment_cost"] = round(
                figures["endpoints"]["users"]["cpu_ratio"]["median"] / enrolled["cpu_ratio"]["median"] - 1, 4)
    if json_output:
        sys.stdout.write(json.dumps(figures) + "\n")
