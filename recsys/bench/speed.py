"""``recsys bench speed``: time and memory of each batch stage next to its reference, on one
generated shop in one run.

- extract: ``recsys.extract.extract`` vs ``pandas.read_sql`` of the same SELECT (on a sub-window
  of about ``--read-sql-interactions`` rows: it holds every row as Python objects) vs the floor,
  ``COPY (query) TO STDOUT`` drained by the client without parsing. Rows/s each.
- matrix: the matrix stage's seconds and peak RSS next to the size of the CSR it builds.
- train: the train stage (both fits, load and save) vs implicit called directly on the same two
  CSRs with the same params; and implicit vs Spark MLlib ALS (implicitPrefs, local[2]) in
  s/iteration on a random subsample of ``--spark-interactions`` nonzeros of the full CSR.
- scoring: publish's scoring (``_ruled_top_n`` with the default params: MMR over 4 × top-N
  candidates, rules, pins) over ``--scoring-users`` users vs the sgemm calls alone (every user
  × every item, the arithmetic of an exact method that scores the whole catalogue: the faster
  of numpy on 4,096-user blocks and the same tiles publish scores, on the same threads;
  publish's scoring stops a user's scan once no later item can enter the list, so it can beat it), one implicit batch ``recommend`` call (plain
  top-N) and a dense floor (one sgemm per user block + argpartition, no filtering). Users/s.
- publish: the publish stage with its parts timed apart: scoring (top-N, similar items), writing
  (JSON payloads + pipelined HSETs: keys/s) and the rest (loading artifacts, checks, switch);
  keys/s vs the write floor measured with redis-py + hiredis (from requirements.txt) on the same
  server: the same number of pre-built values of the same size HSET in publish's shape, no
  payload building. Also vs ``redis-benchmark -t set -P 16`` with the same value size when it is
  installed (Debian's redis-tools; not a Python package). Redis bytes per user (``MEMORY USAGE``
  of the live user hash, and the ``INFO memory`` delta) vs the raw payload (field + JSON value
  bytes) and vs the same payloads as one plain key per user.
- families (``--families``): per model family, its fit on the full CSR with the settings a daily
  run gives it and publish's scoring of up to 20,000 sample users with it, each family in its own
  process (peak RSS); a family that refuses the catalogue (EASE, item-kNN above 20,000 products)
  gives its one-line reason under ``refused``.
- ann: approximate top-N (``recsys.ml.ann``) vs exact on the holdout model's users, as
  ``recsys.bench.ann`` measures it: recall@K against the exact lists, the relative MAP@K delta,
  the speedup (median of alternating repeats, graph build apart).
- peak RSS per stage: each stage (and each in-process reference: raw implicit, scoring) runs in
  a fresh Python process, as each Airflow task does, and reports its own ``VmHWM``; the process
  loads only the stage's modules (``recsys.bench.stage_process``), not this one's. Publish also
  reports the highest RSS sampled in each of its phases (``peak_rss_by_phase``).

Configured servers when RECSYS_DATABASE_URL / RECSYS_REDIS_URL are set, else embedded ones; an
own schema and Redis prefix either way, removed at the end (also on failure). ``--json`` ends
stdout with one JSON object. A comparison whose reference cannot be measured here (a tool that is
not installed, Spark skipped) is null, with the reason under its stage's ``"unavailable"``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import warnings
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import psutil
import scipy.sparse as sp
import typer
from rich.console import Console

from recsys import storage
from recsys.bench.stage_process import Measured, in_fresh_process, our_scoring_seconds, publish_with_parts_timed
from recsys.core import db
from recsys.core.layout import EXCLUDE, FACTORS_FULL, FULL, TRAIN
from recsys.core.params import PipelineParams
from recsys.core.settings import Settings
from recsys.local import services
from recsys.local.demo import DemoShop, load_demo
from recsys.storage import floors, reads

console = Console(stderr=True)
SCORING_BLOCK = 4_096
REDIS_BENCHMARK_KEY = "key:__rand_int__"  # what redis-benchmark -t set writes without -r
# fewer fields than this time too short to give a rate (the test shop writes ~2,000 keys)
WRITE_FLOOR_MIN_FIELDS = 100_000
# the item-item families score from dense rows of the matrix: their scoring is timed on fewer users
FAMILY_SCORING_USERS = 20_000
BENCH_FAMILIES = ("als", "bpr", "item_knn", "ease", "mult_dae", "blend")


# ---------------------------------------------------------------------------------------- setup


def _record(figures: dict, name: str, measured: Measured) -> dict:
    entry = figures.setdefault(name, {})
    entry["seconds"] = round(measured.seconds, 3)
    entry["peak_rss_bytes"] = measured.peak_rss_bytes
    return entry


def _rate(count: float, seconds: float) -> float | None:
    return round(count / seconds, 1) if seconds > 0 else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return round(a / b, 4)


def unavailable(entry: dict, key: str, reason: str) -> None:
    """Report ``entry[key]`` as not measured, and why."""
    entry[key] = None
    entry.setdefault("unavailable", {})[key] = reason
    console.print(f"[yellow]{key} unavailable: {reason}[/yellow]")


def missing_tool(name: str, package: str) -> str | None:
    """Why ``name`` cannot be run here, or None when it is on PATH."""
    if shutil.which(name) is None:
        return f"{name} not on PATH ({package}; not a Python package, so not in requirements.txt)"
    return None


# -------------------------------------------------------------------------------------- extract


def _select_of(copy_statement: str) -> str:
    """The SELECT inside ``COPY (SELECT ...) TO STDOUT ...`` (comments dropped)."""
    body = "\n".join(line for line in copy_statement.splitlines() if not line.lstrip().startswith("--"))
    match = re.search(r"COPY\s*\((.*)\)\s*TO\s+STDOUT", body, re.S | re.I)
    if match is None:
        raise RuntimeError("extract_interactions.sql is not a COPY (query) TO STDOUT statement")
    return match.group(1)


def copy_floor(settings: Settings, window) -> tuple[int, float]:
    """Bytes and seconds of the extract COPY drained without parsing or writing."""
    statement = db.sql_text(settings, "extract_interactions")
    drained = 0
    start = time.perf_counter()
    with db.connect(settings) as conn, conn.cursor() as cur, cur.copy(
        statement, {"start": window.start, "end": window.end}
    ) as copy:
        for chunk in copy:
            drained += len(chunk)
    return drained, time.perf_counter() - start


def read_sql(settings: Settings, start: datetime, end: datetime) -> tuple[int, float]:
    """Rows and seconds of ``pandas.read_sql`` of the extract's SELECT over [start, end)."""
    import pandas as pd

    query = _select_of(db.sql_text(settings, "extract_interactions"))
    began = time.perf_counter()
    with db.connect(settings) as conn, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pandas prefers SQLAlchemy; psycopg works
        frame = pd.read_sql(query, conn, params={"start": start, "end": end})
    rows = len(frame)
    del frame
    return rows, time.perf_counter() - began


# ---------------------------------------------------------------------------------------- train


def fit_implicit(user_items: sp.csr_matrix, params: PipelineParams) -> float:
    """Seconds of implicit's CPU ALS fit alone, as implicit's docs say to run it (BLAS 1 thread)."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    user_items = user_items.tocsr().astype(np.float32)
    with threadpool_limits(limits=1, user_api="blas"):
        model = AlternatingLeastSquares(
            factors=params.factors,
            regularization=params.regularization,
            alpha=params.alpha,
            iterations=params.iterations,
            random_state=params.seed,
        )
        start = time.perf_counter()
        model.fit(user_items, show_progress=False)
        return time.perf_counter() - start


def subsample(matrix: sp.csr_matrix, nnz: int, seed: int) -> sp.csr_matrix:
    coo = matrix.tocoo()
    if nnz >= coo.nnz:
        return matrix.tocsr()
    keep = np.sort(np.random.default_rng(seed).choice(coo.nnz, nnz, replace=False))
    return sp.csr_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=matrix.shape)


def spark_unavailable(spark_interactions: int) -> str | None:
    """Why Spark cannot be compared in this run, or None when it can."""
    if spark_interactions <= 0:
        return "skipped (--spark-interactions 0)"
    if importlib.util.find_spec("pyspark") is None:
        return "pyspark not installed (pip install 'recsys[spark]')"
    return missing_tool("java", "a Java runtime for Spark, e.g. Debian: default-jre-headless")


def spark_fit_seconds(user_items: sp.csr_matrix, params: PipelineParams, tmp: Path) -> dict:
    """Spark MLlib ALS (implicitPrefs, local[2]) on the same nonzeros: fit seconds, excluding
    session start and loading the ratings into a cached DataFrame."""
    import pandas as pd
    import pyspark
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import SparkSession

    coo = user_items.tocoo()
    ratings = pd.DataFrame({"user": coo.row.astype(np.int32), "item": coo.col.astype(np.int32),
                            "rating": coo.data.astype(np.float32)})
    spark = (
        SparkSession.builder.master("local[2]")
        .appName("recsys-bench-speed")
        .config("spark.driver.memory", "6g")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.local.dir", str(tmp))
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .getOrCreate()
    )
    try:
        spark.sparkContext.setLogLevel("ERROR")
        frame = spark.createDataFrame(ratings).repartition(4).cache()
        frame.count()
        als = ALS(
            rank=params.factors, maxIter=params.iterations, regParam=params.regularization,
            alpha=params.alpha, implicitPrefs=True, userCol="user", itemCol="item", ratingCol="rating",
            seed=params.seed, coldStartStrategy="drop",
        )
        start = time.perf_counter()
        model = als.fit(frame)
        model.userFactors.count()  # factors are lazy until used
        seconds = time.perf_counter() - start
        return {"version": pyspark.__version__, "seconds": round(seconds, 3)}
    finally:
        spark.stop()


# -------------------------------------------------------------------------------------- scoring


def blas_floor(user_factors: np.ndarray, item_factors: np.ndarray, n: int) -> tuple[float, float]:
    """Seconds of top-n for every row of ``user_factors``: one sgemm per block + argpartition;
    and the seconds of the sgemm calls alone (the arithmetic every method has to do)."""
    item_t = np.ascontiguousarray(item_factors.T, dtype=np.float32)
    gemm = 0.0
    start = time.perf_counter()
    for lo in range(0, len(user_factors), SCORING_BLOCK):
        began = time.perf_counter()
        scores = user_factors[lo : lo + SCORING_BLOCK] @ item_t
        gemm += time.perf_counter() - began
        top = np.argpartition(-scores, n, axis=1)[:, :n]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        np.take_along_axis(top, order, axis=1)
    return time.perf_counter() - start, gemm


# -------------------------------------------------------------------------------------- publish


def redis_py_write_floor(settings: Settings, value_bytes: int, fields: int) -> float:
    """Fields/s of the fastest write publish could do with its own client: ``fields`` pre-built
    values of ``value_bytes`` HSET into scratch hashes on publish's bucket slots through
    redis-py + hiredis, in publish's shape (fields per HSET, HSETs per round trip), with no
    payload to build. The hashes are removed afterwards."""
    from recsys.storage.builds import HSET_CHUNK, HSETS_PER_ROUND_TRIP

    client, keys = storage.connect(settings)
    scratch = [f"{tag}:bench-write-floor" for tag in keys.bucket_tags]  # publish's buckets, its slots
    seconds = floors.hset_seconds(client, scratch, value_bytes, fields, HSET_CHUNK, HSETS_PER_ROUND_TRIP)
    return _rate(fields, seconds)


def redis_benchmark_set_rps(redis_url: str, value_bytes: int, requests: int) -> float:
    """``redis-benchmark -t set -P 16`` on the same server; its one key is removed afterwards
    unless it existed before."""
    from recsys.storage.connection import sync_client

    url = urllib.parse.urlparse(redis_url)
    database = int((url.path or "/0").strip("/") or 0)
    client = sync_client(redis_url)
    existed = bool(client.exists(REDIS_BENCHMARK_KEY))
    command = ["redis-benchmark", "-h", url.hostname or "127.0.0.1", "-p", str(url.port or 6379),
               "--dbnum", str(database), "-t", "set", "-P", "16", "-c", "50", "-n", str(requests),
               "-d", str(max(1, value_bytes)), "-q"]
    if url.password:
        command += ["-a", urllib.parse.unquote(url.password), "--no-auth-warning"]
    try:
        output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=300).stdout
    finally:
        if not existed:
            client.delete(REDIS_BENCHMARK_KEY)
    return float(re.search(r"SET: ([\d.]+) requests per second", output).group(1))


def redis_payload(settings: Settings, sample: int = 20_000) -> dict:
    """Live user lists: MEMORY USAGE (every field, every bucket), fields, raw field + value bytes
    (sampled), and what the sampled users would take as one plain key each."""
    client, keys = storage.connect(settings)
    live = reads.live_build(client, keys)
    fields = live.entry_counts()["user_recs"]
    usage = live.memory_usage("user_recs")
    pairs = []
    for user, entry in live.entries("user_recs"):
        pairs.append((user, json.dumps(entry, separators=(",", ":"))))
        if len(pairs) >= sample:
            break
    mean = float(np.mean([len(f.encode()) + len(v.encode()) for f, v in pairs])) if pairs else 0.0
    # the floor writes fields of its own (numbers of about the same length): its values are ours alone
    mean_value = float(np.mean([len(v.encode()) for _, v in pairs])) if pairs else 0.0
    return {"fields": fields, "memory_usage_bytes": usage, "raw_bytes_per_user": round(mean, 1),
            "mean_value_bytes": round(mean_value, 1),
            "plain_keys_bytes_per_user": floors.plain_keys_bytes_per_entry(client, f"{keys.tag}:bench-plain:", pairs)}


# ------------------------------------------------------------- run in fresh processes (picklable)


def implicit_fit_seconds(matrix_files: tuple[Path, ...], params: PipelineParams) -> float:
    return sum(fit_implicit(sp.load_npz(path).tocsr(), params) for path in matrix_files)


def _scoring_inputs(run) -> tuple:
    from recsys.ml.als import load_factors
    from recsys.pipeline.matrix import inactive_items

    user_factors, item_factors = load_factors(run.paths.model / FACTORS_FULL)
    exclude = sp.load_npz(run.paths.matrix / EXCLUDE).tocsr()
    return user_factors, item_factors, exclude, inactive_items(run.paths.matrix)


def reference_scoring_seconds(run, users: np.ndarray, top_n: int) -> dict[str, float]:
    """implicit's batch recommend in one call; the sgemm + argpartition floor; and the sgemm
    calls alone, as numpy blocks of 4,096 users and as publish's own tiles."""
    from recsys.ml.ranking import als_model
    from recsys.ml.top_n import ItemVectors, sgemm_only

    user_factors, item_factors, exclude, blocked = _scoring_inputs(run)
    model = als_model(user_factors, item_factors)
    start = time.perf_counter()
    model.recommend(users, exclude[users], N=top_n, filter_already_liked_items=True,
                    filter_items=blocked if len(blocked) else None)
    implicit_seconds = time.perf_counter() - start
    floor_seconds, gemm_seconds = blas_floor(np.ascontiguousarray(user_factors[users]), item_factors, top_n)
    items = ItemVectors.of(item_factors)
    start = time.perf_counter()
    sgemm_only(user_factors[users], items)
    tiled_seconds = time.perf_counter() - start
    return {"implicit": implicit_seconds, "floor": floor_seconds, "sgemm": gemm_seconds, "sgemm_tiled": tiled_seconds}


def similar_seconds(run, params: PipelineParams) -> dict[str, float]:
    """Similar products of every product, as publish ranks them (``similar_items``, its kernels
    loaded first); the sgemm calls alone over the same products and catalogue; implicit's
    ``similar_items`` on the same factors."""
    from recsys.ml.ranking import als_model
    from recsys.ml.top_n import ItemVectors, blocked_mask, sgemm_only, similar_items

    user_factors, item_factors, _, blocked = _scoring_inputs(run)
    items = ItemVectors.of(item_factors)
    every = np.arange(len(item_factors), dtype=np.int32)
    n = max(params.similar_n, params.bought_together_n)
    mask = blocked_mask(len(item_factors), blocked)
    similar_items(items, every[:1], n, mask)  # compiled kernels loaded, the cosine vectors cached
    start = time.perf_counter()
    similar_items(items, every, n, mask)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    sgemm_only(items.cosine.factors, items.cosine)
    sgemm = time.perf_counter() - start
    start = time.perf_counter()
    als_model(user_factors, item_factors).similar_items(every, N=n + 1, filter_items=blocked if len(blocked) else None)
    implicit = time.perf_counter() - start
    return {"ours": ours, "sgemm": sgemm, "implicit": implicit}


def family_cost(run, family: str, users: np.ndarray, params: PipelineParams) -> dict[str, Any]:
    """What one model family costs a shop: its fit on the full weighted CSR with the settings a
    daily run gives it (``candidate_grids``; a blend: ALS and BPR at 0.5, both fitted) and
    publish's scoring of ``users`` with it (``_ruled_top_n``, default params). A family that
    refuses the catalogue (EASE and item-kNN keep items x items arrays) says why instead."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys.core.errors import InputError
    from recsys.core.layout import ITEMS
    from recsys.core.rules import RuleSnapshot
    from recsys.ml import selection
    from recsys.ml.families import Blend, FactorModel
    from recsys.ml.merchandising import Merchandising
    from recsys.pipeline.matrix import inactive_items
    from recsys.pipeline.publish.stage import _ruled_top_n
    from recsys.pipeline.train import candidate_grids

    full = sp.load_npz(run.paths.matrix / FULL).tocsr()
    grids = candidate_grids(params)
    model = (
        Blend([selection.build("als", grids["als"][0]), selection.build("bpr", grids["bpr"][0])], 0.5)
        if family == "blend" else selection.build(family, grids[family][0])
    )
    start = time.perf_counter()
    try:
        model.fit(full, params.seed)
    except InputError as refused:
        return {"refused": str(refused)}
    fit_seconds = time.perf_counter() - start
    fitted_on = None if isinstance(model, FactorModel) else full
    exclude = sp.load_npz(run.paths.matrix / EXCLUDE).tocsr()
    items = pq.read_table(run.paths.matrix / ITEMS, columns=["id", "category"])
    merchandising = Merchandising(RuleSnapshot(taken_at=datetime.now(UTC)), items["id"].to_pylist(),
                                  items["category"].to_numpy(zero_copy_only=False))
    user_ids, inactive = pa.array([str(user) for user in users]), inactive_items(run.paths.matrix)
    _ruled_top_n(merchandising, model, fitted_on, user_ids[:1], users[:1], exclude, inactive, params, None)
    start = time.perf_counter()
    _ruled_top_n(merchandising, model, fitted_on, user_ids, users, exclude, inactive, params, None)
    scoring_seconds = time.perf_counter() - start
    return {"params": model.params(), "fit_seconds": round(fit_seconds, 3), "scoring_seconds": round(scoring_seconds, 3),
            "scoring_users_per_s": _rate(len(users), scoring_seconds)}


def run_users(run) -> int:
    import pyarrow.parquet as pq

    from recsys.core.layout import USERS

    return pq.read_metadata(run.paths.matrix / USERS).num_rows


# ---------------------------------------------------------------------------------------- bench


def measure_publish(settings: Settings, run, with_redis_benchmark: bool) -> dict:
    """The publish stage in a fresh process (its parts timed apart) on ``settings``' Redis, next to
    the redis-py write floor on the same server, with its memory per user, overall and per node."""
    client, keys = storage.connect(settings)
    used_before = floors.memory_per_node(client)
    measured = in_fresh_process(publish_with_parts_timed, settings, run)
    entry = {"seconds": round(measured.seconds, 3), "peak_rss_bytes": measured.peak_rss_bytes}
    published, parts, peaks = measured.value
    used_after = floors.memory_per_node(client)
    # every entry the writing phase stores: users' lists, similar products, bought together
    keys_written = published.users + published.products_with_similar + published.products_with_bought_together
    write_seconds = parts.get("writing", 0.0)
    other_seconds = entry["seconds"] - sum(parts.values())
    payload = redis_payload(settings)
    value_bytes = int(payload["mean_value_bytes"])
    floor_fields = max(keys_written, WRITE_FLOOR_MIN_FIELDS)
    live = reads.live_build(client, keys)
    users_by_node = live.entries_by_node("user_recs")
    delta_by_node = {node: used_after[node] - used_before.get(node, 0) for node in used_after}
    entry.update({
        "users": published.users, "keys_written": keys_written,
        "scoring_seconds": round(parts.get("scoring", 0.0), 3),
        # every user of the matrix is scored, with or without a list at the end
        "scoring_users_per_s": _rate(run_users(run), parts.get("scoring", 0.0)),
        "similar_seconds": round(parts.get("similar", 0.0), 3),
        # the highest RSS sampled in each phase (every 10 ms; "other": loading, checks, switch)
        "peak_rss_by_phase": peaks,
        "write_seconds": round(write_seconds, 3),
        "other_seconds": round(other_seconds, 3),
        "keys_per_s": _rate(keys_written, write_seconds),
        "keys_per_s_without_scoring": _rate(keys_written, write_seconds + other_seconds),
        "redis_py_write_floor": {"fields": floor_fields, "value_bytes": value_bytes,
                                 "fields_per_s": redis_py_write_floor(settings, value_bytes, floor_fields)},
        "redis_memory_usage_bytes": payload["memory_usage_bytes"],
        "redis_info_delta_bytes": sum(delta_by_node.values()),
        "raw_payload_bytes_per_user": payload["raw_bytes_per_user"],
        "plain_keys_bytes_per_user": payload["plain_keys_bytes_per_user"],
        "users_by_node": users_by_node,
        "info_delta_bytes_per_user_by_node": {
            node: _ratio(delta, users_by_node.get(node, 0)) for node, delta in delta_by_node.items()
        },
    })
    entry["ratio_to_redis_py_write_floor"] = _ratio(entry["keys_per_s"], entry["redis_py_write_floor"]["fields_per_s"])
    if with_redis_benchmark and (reason := missing_tool("redis-benchmark", "Debian: redis-tools")):
        unavailable(entry, "redis_benchmark_set_rps", reason)
        unavailable(entry, "ratio_to_redis_benchmark", reason)
    elif with_redis_benchmark:
        entry["redis_benchmark_set_rps"] = redis_benchmark_set_rps(settings.require_redis_url, value_bytes, 1_000_000)
        entry["ratio_to_redis_benchmark"] = _ratio(entry["keys_per_s"], entry["redis_benchmark_set_rps"])
    entry["bytes_per_user"] = _ratio(payload["memory_usage_bytes"], published.users)
    entry["info_delta_bytes_per_user"] = _ratio(entry["redis_info_delta_bytes"], published.users)
    entry["bytes_per_user_over_raw"] = _ratio(entry["bytes_per_user"], payload["raw_bytes_per_user"])
    entry["bytes_per_user_over_plain_keys"] = _ratio(entry["bytes_per_user"], payload["plain_keys_bytes_per_user"])
    return entry


def run_speed(
    settings: Settings,
    users: int,
    items: int,
    interactions: int,
    spark_interactions: int,
    read_sql_interactions: int,
    scoring_users: int,
    seed: int,
    cluster: bool = False,
    families: tuple[str, ...] = (),
) -> dict:
    from recsys.pipeline.evaluate import evaluate
    from recsys.pipeline.stages import (
        extract_stage,
        matrix_stage,
        plan_run,
        train_stage,
    )

    params = PipelineParams()
    end = datetime.now(UTC).replace(microsecond=0)
    # every generated event inside the extract window
    shop = DemoShop(users=users, products=items, interactions=interactions, days=params.lookback_days, seed=seed)
    figures: dict = {"config": {"users": users, "items": items, "interactions_requested": interactions,
                                "factors": params.factors, "iterations": params.iterations,
                                "regularization": params.regularization, "alpha": params.alpha,
                                "top_n": params.top_n, "cpu_count": psutil.cpu_count(),
                                "python": sys.version.split()[0]}}
    # what a stage process holds before it imports its stage: the interpreter and the CLI
    baseline_rss = in_fresh_process(time.sleep, 0).peak_rss_bytes

    console.print(f"demo shop: {users:,} users x {items:,} products, ~{interactions:,} interactions -> Postgres ...")
    start = time.perf_counter()
    loaded = load_demo(settings, shop, end=end, progress=True)
    load_seconds = time.perf_counter() - start
    figures["load"] = {"seconds": round(load_seconds, 3), "rows": loaded.interactions,
                       "rows_per_s": _rate(loaded.interactions, load_seconds)}
    with db.connect(settings) as conn:
        conn.execute("ANALYZE interactions")

    run = plan_run(settings, end, params, use_tuned=False)
    rows = loaded.interactions

    console.print("extract: COPY floor, ours, pandas.read_sql ...")
    floor_bytes, floor_seconds = copy_floor(settings, run.window)  # also warms the cache for ours
    floor_bytes, floor_seconds = copy_floor(settings, run.window)
    measured = in_fresh_process(extract_stage, settings, run)
    entry = _record(figures, "extract", measured)
    extracted = measured.value
    ours_rps = _rate(extracted.rows_read, measured.seconds)
    share = 1.0 if not read_sql_interactions else min(1.0, read_sql_interactions / max(rows, 1))
    sql_end = run.window.end if share >= 1.0 else run.window.start + (run.window.end - run.window.start) * share
    sql_rows, sql_seconds = read_sql(settings, run.window.start, sql_end)
    entry.update({
        "rows": extracted.rows_read, "rows_per_s": ours_rps,
        "copy_floor": {"rows": rows, "bytes": floor_bytes, "seconds": round(floor_seconds, 3),
                       "rows_per_s": _rate(rows, floor_seconds)},
        "read_sql": {"rows": sql_rows, "seconds": round(sql_seconds, 3), "rows_per_s": _rate(sql_rows, sql_seconds)},
    })
    entry["ratio_to_copy_floor"] = _ratio(ours_rps, entry["copy_floor"]["rows_per_s"])
    entry["speedup_vs_read_sql"] = _ratio(ours_rps, entry["read_sql"]["rows_per_s"])

    console.print("matrix ...")
    measured = in_fresh_process(matrix_stage, settings, run)
    entry = _record(figures, "matrix", measured)
    built = measured.value
    full = sp.load_npz(run.paths.matrix / FULL).tocsr()
    csr_bytes = full.data.nbytes + full.indices.nbytes + full.indptr.nbytes
    entry.update({"users": built.n_users, "items": built.n_items, "nnz": built.nnz, "csr_bytes": csr_bytes,
                  "peak_rss_over_csr": _ratio(entry["peak_rss_bytes"], csr_bytes)})

    console.print("train: our stage, implicit directly on the same CSRs ...")
    entry = _record(figures, "train", in_fresh_process(train_stage, settings, run))
    implicit = in_fresh_process(
        implicit_fit_seconds, (run.paths.matrix / TRAIN, run.paths.matrix / FULL), params
    )
    entry["fits"] = 2
    entry["implicit_seconds"] = round(implicit.value, 3)
    entry["implicit_peak_rss_bytes"] = implicit.peak_rss_bytes
    entry["time_ratio_to_implicit"] = _ratio(entry["seconds"], implicit.value)
    entry["overhead_percent"] = round((entry["seconds"] / implicit.value - 1) * 100, 2)
    if reason := spark_unavailable(spark_interactions):
        entry["subsample"] = None
        unavailable(entry, "speedup_vs_spark", reason)
    else:
        sample = subsample(full, spark_interactions, seed)
        console.print(f"train: implicit vs Spark ALS on {sample.nnz:,} nonzeros ...")
        implicit_sample = fit_implicit(sample, params)
        with tempfile.TemporaryDirectory(prefix="recsys-bench-spark-") as spark_tmp:
            spark = spark_fit_seconds(sample, params, Path(spark_tmp))
        entry["subsample"] = {
            "nnz": int(sample.nnz),
            "implicit_s_per_iteration": round(implicit_sample / params.iterations, 4),
            "spark_s_per_iteration": round(spark["seconds"] / params.iterations, 4),
            "spark_version": spark["version"],
        }
        del sample
        entry["speedup_vs_spark"] = _ratio(entry["subsample"]["spark_s_per_iteration"],
                                           entry["subsample"]["implicit_s_per_iteration"])
    del full

    console.print("scoring: ours, implicit batch recommend, sgemm floor ...")
    rng = np.random.default_rng(seed)
    n_score = min(scoring_users, built.n_users)
    sample_users = np.sort(rng.choice(built.n_users, n_score, replace=False)).astype(np.int32)
    measured = in_fresh_process(our_scoring_seconds, run, sample_users, params)
    entry = _record(figures, "scoring", measured)
    entry["seconds"] = round(measured.value, 3)
    references = in_fresh_process(reference_scoring_seconds, run, sample_users, params.top_n).value
    entry.update({
        "users": n_score, "top_n": params.top_n, "diversity_lambda": params.diversity_lambda,
        "users_per_s": _rate(n_score, measured.value),
        "implicit_users_per_s": _rate(n_score, references["implicit"]),
        "blas_floor_users_per_s": _rate(n_score, references["floor"]),
        "sgemm_blocks_users_per_s": _rate(n_score, references["sgemm"]),
        "sgemm_tiles_users_per_s": _rate(n_score, references["sgemm_tiled"]),
        # the arithmetic alone, the faster of the two ways measured
        "sgemm_only_users_per_s": _rate(n_score, min(references["sgemm"], references["sgemm_tiled"])),
    })
    entry["ratio_to_sgemm_only"] = _ratio(entry["users_per_s"], entry["sgemm_only_users_per_s"])
    entry["ratio_to_blas_floor"] = _ratio(entry["users_per_s"], entry["blas_floor_users_per_s"])
    entry["ratio_to_implicit"] = _ratio(entry["users_per_s"], entry["implicit_users_per_s"])
    # float32 users x factors and items x factors: what the model file holds, without loading it
    factor_bytes = (built.n_users + built.n_items) * params.factors * np.dtype(np.float32).itemsize

    console.print("similar products: ours, the sgemm calls alone, implicit ...")
    similar = in_fresh_process(similar_seconds, run, params)
    entry = _record(figures, "similar", similar)
    entry.update({
        "items": built.n_items,
        "items_per_s": _rate(built.n_items, similar.value["ours"]),
        "sgemm_only_items_per_s": _rate(built.n_items, similar.value["sgemm"]),
        "implicit_items_per_s": _rate(built.n_items, similar.value["implicit"]),
    })
    entry["ratio_to_sgemm_only"] = _ratio(entry["items_per_s"], entry["sgemm_only_items_per_s"])
    entry["ratio_to_implicit"] = _ratio(entry["items_per_s"], entry["implicit_items_per_s"])

    if families:
        console.print(f"model families: fit and publish scoring of each ({', '.join(families)}) ...")
        family_users = sample_users[: min(len(sample_users), FAMILY_SCORING_USERS)]
        figures["families"] = {"scoring_users": len(family_users)}
        for family in families:
            measured = in_fresh_process(family_cost, run, family, family_users, params)
            figures["families"][family] = {**measured.value, "peak_rss_bytes": measured.peak_rss_bytes}

    console.print("approximate top-N vs exact on the holdout model ...")
    from recsys.bench.ann import on_run as ann_on_run

    figures["ann"] = in_fresh_process(ann_on_run, run, params, n_score, seed).value

    console.print("publish: stage (scoring timed apart), then the write floors ...")
    evaluate(run.paths.matrix, run.paths.model, run.paths.evaluation, params, None)
    figures["publish"] = measure_publish(settings, run, with_redis_benchmark=True)
    scored = figures["publish"]["scoring_users_per_s"]
    figures["publish"]["scoring_ratio_to_sgemm_only"] = _ratio(scored, figures["scoring"]["sgemm_only_users_per_s"])
    if cluster:
        console.print("publish again, on a local Redis Cluster (3 masters with a replica each) ...")
        from recsys.local.cluster import LocalCluster

        with LocalCluster(masters=3, replicas=1) as local:
            on_cluster = settings.model_copy(update={"redis_url": local.url})
            entry = measure_publish(on_cluster, run, with_redis_benchmark=False)
            entry["masters"], entry["replicas_per_master"] = 3, 1
            entry["keys_per_s_over_single_node"] = _ratio(entry["keys_per_s"], figures["publish"]["keys_per_s"])
            figures["cluster"] = {"publish": entry}

    stages = ("extract", "matrix", "train", "scoring", "publish")
    peak = max(figures[stage]["peak_rss_bytes"] for stage in stages)
    figures["memory"] = {
        "process_baseline_rss_bytes": baseline_rss,
        "peak_rss_bytes": peak,
        "peak_rss_by_stage": {stage: figures[stage]["peak_rss_bytes"] for stage in stages},
        "csr_bytes": csr_bytes,
        "factor_bytes": factor_bytes,
        "peak_rss_ratio": _ratio(peak, csr_bytes + factor_bytes),
    }
    return figures


# Every ratio is measured against references the project installs itself, except those listed in
# OPTIONAL_RATIOS: null when their reference is not there, with the reason under "unavailable".
RATIOS = (
    ("extract", "ratio_to_copy_floor"), ("extract", "speedup_vs_read_sql"),
    ("train", "time_ratio_to_implicit"), ("train", "speedup_vs_spark"),
    ("scoring", "ratio_to_sgemm_only"), ("scoring", "ratio_to_blas_floor"), ("scoring", "ratio_to_implicit"),
    ("similar", "ratio_to_sgemm_only"), ("similar", "ratio_to_implicit"),
    ("publish", "scoring_ratio_to_sgemm_only"),
    ("publish", "ratio_to_redis_py_write_floor"), ("publish", "ratio_to_redis_benchmark"),
    ("publish", "bytes_per_user"), ("memory", "peak_rss_ratio"),
)
OPTIONAL_RATIOS = (("train", "speedup_vs_spark"), ("publish", "ratio_to_redis_benchmark"))


def _summary(figures: dict) -> str:
    lines = []
    for stage, key in RATIOS:
        why_not = figures[stage].get("unavailable", {}).get(key)
        lines.append(f"{stage}.{key} = {figures[stage].get(key)}" + (f" ({why_not})" if why_not else ""))
    e, t, s, p = figures["extract"], figures["train"], figures["scoring"], figures["publish"]
    lines.append(
        f"extract {e['rows_per_s']:,} rows/s (COPY floor {e['copy_floor']['rows_per_s']:,}, read_sql "
        f"{e['read_sql']['rows_per_s']:,}); train {t['seconds']} s vs implicit {t['implicit_seconds']} s; "
        f"scoring {s['users_per_s']:,} users/s (sgemm alone {s['sgemm_only_users_per_s']:,}, implicit "
        f"{s['implicit_users_per_s']:,}, floor {s['blas_floor_users_per_s']:,}); publish {p['keys_per_s']:,} keys/s "
        f"(redis-py write floor {p['redis_py_write_floor']['fields_per_s']:,} fields/s, "
        f"redis-benchmark SET {p['redis_benchmark_set_rps']})"
    )
    return "\n".join(lines)


def speed_bench_command(
    users: Annotated[int, typer.Option(min=100, help="demo shop users")] = 100_000,
    items: Annotated[int, typer.Option(min=50, help="demo shop products")] = 20_000,
    interactions: Annotated[int, typer.Option(min=1_000, help="demo shop interactions (all event rows)")] = 2_000_000,
    json_output: Annotated[bool, typer.Option("--json", help="end stdout with one JSON object")] = False,
    spark_interactions: Annotated[
        int, typer.Option(min=0, help="nonzeros of the Spark vs implicit subsample; 0 skips Spark")
    ] = 2_000_000,
    read_sql_interactions: Annotated[
        int, typer.Option(min=0, help="about this many rows for the pandas.read_sql reference; 0 = all")
    ] = 2_000_000,
    scoring_users: Annotated[int, typer.Option(min=1, help="users scored by each top-N method")] = 100_000,
    seed: int = 42,
    cluster: Annotated[
        bool, typer.Option("--cluster", help="publish again on a local Redis Cluster (3 masters, a replica each) and compare")
    ] = False,
    families: Annotated[
        str, typer.Option(help="model families whose fit and publish scoring are measured (comma-separated; '' skips)")
    ] = ",".join(BENCH_FAMILIES),
) -> None:
    """Time and memory of extract, matrix, train, scoring and publish on one generated shop, each
    next to its reference (COPY floor, read_sql, raw implicit, Spark ALS, sgemm floor, implicit
    recommend, redis-py write floor, redis-benchmark SET)."""
    _terminate_cleanly()
    with services.isolated("bench-speed") as settings:
        figures = run_speed(settings, users, items, interactions, spark_interactions, read_sql_interactions,
                            scoring_users, seed, cluster, _families(families))
    console.print(_summary(figures))
    if json_output:
        sys.stdout.write(json.dumps(figures, allow_nan=False, default=_json_default) + "\n")


def _families(text: str) -> tuple[str, ...]:
    chosen = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = sorted(set(chosen) - set(BENCH_FAMILIES))
    if unknown:
        raise typer.BadParameter(f"unknown model families {', '.join(unknown)}; known: {', '.join(BENCH_FAMILIES)}",
                                 param_hint="--families")
    return chosen


def _terminate_cleanly() -> None:
    """SIGTERM unwinds like Ctrl-C, so the schema and Redis keys are still removed."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    with suppress(ValueError):  # not the main thread (e.g. called from a test runner thread)
        signal.signal(signal.SIGTERM, stop)


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")

