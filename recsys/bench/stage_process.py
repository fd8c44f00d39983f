"""Stages and references of ``recsys bench speed`` run in a fresh Python process each, as an
Airflow task runs a stage, so each reports its own peak RSS.

This module imports nothing beyond the standard library at its top: a child process loads it
to run its function, and what it imported would count in the stage's peak (the bench's own
module loads pandas, rich, psutil and the local services, which no stage process holds).
"""

from __future__ import annotations

import multiprocessing
import resource
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Measured:
    value: Any
    seconds: float  # of the call itself, without process start and imports
    peak_rss_bytes: int  # of the whole process, imports included


def peak_rss_bytes() -> int:
    """This process's peak RSS. Linux: VmHWM, which starts afresh at exec; ru_maxrss would carry
    over the parent's peak into a spawned child."""
    with suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _call_measured(function: Callable, args: tuple) -> Measured:
    start = time.perf_counter()
    value = function(*args)
    seconds = time.perf_counter() - start
    return Measured(value, seconds, peak_rss_bytes())


def in_fresh_process(function: Callable, *args) -> Measured:
    """Run ``function(*args)`` in a new Python process, like an Airflow task: its peak RSS is its
    own, not what earlier stages left in this one."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_call_measured, function, args).result()


def our_scoring_seconds(run, users, params) -> float:
    """Publish's scoring (``_ruled_top_n``: rules of the users' segments, MMR, pins) of ``users``
    with ``params``, as publish runs it; the bench's shop has no rules. Its compiled kernels are
    loaded before the clock starts (a steady rate; publish's own scoring phase includes that
    load, about 0.4 s once per process)."""
    from datetime import UTC, datetime

    import pyarrow as pa
    import pyarrow.parquet as pq
    import scipy.sparse as sp

    from recsys.core.layout import EXCLUDE, FACTORS_FULL, ITEMS
    from recsys.core.rules import RuleSnapshot
    from recsys.ml.families import load_model
    from recsys.ml.merchandising import Merchandising
    from recsys.pipeline.matrix import inactive_items
    from recsys.pipeline.publish.stage import _ruled_top_n

    model = load_model(run.paths.model / FACTORS_FULL, users_on_disk=True)  # as publish loads it
    exclude = sp.load_npz(run.paths.matrix / EXCLUDE).tocsr()
    inactive = inactive_items(run.paths.matrix)
    items = pq.read_table(run.paths.matrix / ITEMS, columns=["id", "category"])
    merchandising = Merchandising(RuleSnapshot(taken_at=datetime.now(UTC)), items["id"].to_pylist(),
                                  items["category"].to_numpy(zero_copy_only=False))
    user_ids = pa.array([str(user) for user in users])
    _ruled_top_n(merchandising, model, None, user_ids[:1], users[:1], exclude, inactive, params, None)
    start = time.perf_counter()
    _ruled_top_n(merchandising, model, None, user_ids, users, exclude, inactive, params, None)
    return time.perf_counter() - start


def current_rss_bytes() -> int:
    with suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def publish_with_parts_timed(settings, run):
    """The publish stage, with its phases (scoring, similar, writing) timed through its own hook,
    and the highest RSS seen in each (sampled every 10 ms; "other": outside the phases)."""
    import threading
    from contextlib import contextmanager

    from recsys.pipeline.publish.stage import PhaseTimings
    from recsys.pipeline.stages import publish_stage

    peaks: dict[str, int] = {}
    now = ["other"]
    done = threading.Event()

    class SampledTimings(PhaseTimings):
        @contextmanager
        def phase(self, name):
            now[0] = name
            try:
                with super().phase(name):
                    yield
            finally:
                sample()
                now[0] = "other"

    def sample() -> None:
        peaks[now[0]] = max(peaks.get(now[0], 0), current_rss_bytes())

    def sampling() -> None:
        while not done.wait(0.01):
            sample()

    sampler = threading.Thread(target=sampling, daemon=True)
    sampler.start()
    timings = SampledTimings()
    try:
        published = publish_stage(settings, run, timings=timings)
    finally:
        done.set()
        sampler.join()
    return published, timings.seconds, peaks
