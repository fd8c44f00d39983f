"""Publish stage: top-N per user, similar products and top buys into Redis, switched live at once.

Three steps, so the per-user scoring can fan out over workers (the DAG maps ``publish_shard``);
a failure at any point leaves the live version untouched:

1. ``prepare_publish``: refuse early if a fresher version is already live (backfills never go back
   in time), clear this version's staging keys, stage similar products and top buys;
2. ``publish_shard`` (once per shard, any order, idempotent): score a contiguous range of users
   and write their lists into the staging hash;
3. ``finish_publish``: check every shard and count, refuse an empty result, then in one
   WATCH/MULTI/EXEC re-check freshness, move the live keys to ``v:<old>`` with a TTL and rename
   the staging keys live. Readers see the old version or the new one, never a mix.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import redis
import scipy.sparse as sp

from recsys.errors import EmptyResultError, StaleVersionError
from recsys.extract import Window
from recsys.matrix import inactive_items
from recsys.params import PipelineParams
from recsys.ranking import als_model, recommend_top_n, similar_items
from recsys.settings import Settings
from recsys.store import STRUCTURES, KeyLayout, layout, redis_client, top_buys_field
from recsys.train import load_factors

log = logging.getLogger(__name__)

# fields per HSET and HSETs per round trip: measured near redis-benchmark's pipelined SET rate
HSET_CHUNK = 10_000
HSETS_PER_ROUND_TRIP = 8
PAYLOAD_BATCH = 100_000  # users whose JSON is built at once: bounds a shard's payload memory
# staging keys of a publish that died half-way expire by themselves; the switch removes the TTL
STAGING_TTL_SECONDS = 6 * 3600
_CANONICAL_INT = r"^(0|-?[1-9][0-9]{0,15})$"
# printable ASCII except '"' and '\\': JSON-quoting such an id is just adding the quotes
_NEEDS_NO_ESCAPE = r"^[\x20\x21\x23-\x5b\x5d-\x7e]*$"
_JS_SAFE_INT = 2**53
TOP_BUYS_KEY_ALL = top_buys_field(None)


def id_codec(ids: list[str]) -> Callable[[str], int | str]:
    """Ids go back as the shop stored them: integers if every id is a canonical integer (that a
    browser can hold exactly), strings otherwise ("007" stays "007")."""
    canonical = re.compile(_CANONICAL_INT)
    if all(canonical.match(i) and abs(int(i)) < _JS_SAFE_INT for i in ids):
        return int
    return str


def json_id_tokens(ids: pa.Array) -> pa.Array:
    """Each id as the JSON text ``json.dumps(id_codec(ids)(id))`` writes, computed column-wise:
    publishing a million users must not cost a million Python calls."""
    ids = ids.cast(pa.string())
    if len(ids) == 0:
        return ids
    canonical = pc.all(pc.match_substring_regex(ids, _CANONICAL_INT)).as_py()
    if canonical and pc.max(pc.abs(pc.cast(ids, pa.int64()))).as_py() < _JS_SAFE_INT:
        return ids
    quoted = pc.binary_join_element_wise('"', ids, '"', "")
    needs_escape = pc.invert(pc.match_substring_regex(ids, _NEEDS_NO_ESCAPE))
    if not pc.any(needs_escape).as_py():
        return quoted
    escaped = pa.array([json.dumps(i) for i in ids.filter(needs_escape).to_pylist()], pa.string())
    return pc.replace_with_mask(quoted, needs_escape, escaped)


def json_list_objects(
    owner_key: str, owner_tokens: pa.Array, list_key: str, member_tokens: pa.Array, lists: np.ndarray
) -> pa.Array:
    """``{"<owner_key>":<owner>,"<list_key>":[<member>,...]}`` per row of ``lists`` (indices into
    ``member_tokens``; -1 marks an empty slot), in compact ``json.dumps`` form."""
    filled = lists >= 0
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum(filled.sum(axis=1), out=offsets[1:])
    members = pc.take(member_tokens, pa.array(lists[filled], pa.int32()))
    joined = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), members), ",")
    return pc.binary_join_element_wise(
        f'{{"{owner_key}":', owner_tokens, f',"{list_key}":[', joined, "]}", ""
    )


def version_name(window: Window, params: PipelineParams) -> str:
    """Same data window and params -> same version: reruns overwrite instead of duplicating."""
    return f"{window.end.astimezone(UTC):%Y%m%dT%H%M%SZ}-{params.fingerprint()}"


@dataclass(frozen=True)
class PublishResult:
    version: str
    users: int
    users_without_recommendations: int
    products_with_similar: int


def _write_hash(client: redis.Redis, key: str, fields: pa.Array, values: pa.Array) -> int:
    """HSET ``fields`` -> ``values`` into ``key`` in pipelined chunks; returns fields written."""
    pipe = client.pipeline(transaction=False)
    for number, start in enumerate(range(0, len(fields), HSET_CHUNK), start=1):
        pairs = [None] * (2 * min(HSET_CHUNK, len(fields) - start))
        pairs[0::2] = fields.slice(start, HSET_CHUNK).to_pylist()
        pairs[1::2] = values.slice(start, HSET_CHUNK).to_pylist()
        pipe.hset(key, items=pairs)
        if number % HSETS_PER_ROUND_TRIP == 0:
            pipe.execute()
    pipe.expire(key, STAGING_TTL_SECONDS)
    pipe.execute()
    return len(fields)


def _dumps(value: dict) -> str:
    return json.dumps(value, separators=(",", ":"))


def _live_data_end(client: redis.Redis, keys: KeyLayout) -> float | None:
    raw = client.hget(keys.live("meta"), "data_end_ts")
    return None if raw is None else float(raw)


def _refuse_if_stale(live_end: float | None, window: Window, live_version: str | None) -> None:
    if live_end is not None and live_end > window.end.timestamp():
        raise StaleVersionError(
            f"live version {live_version} has data up to "
            f"{datetime.fromtimestamp(live_end, UTC).isoformat()}, newer than this run's "
            f"{window.end.isoformat()}; not replacing it"
        )


def switch_live(client: redis.Redis, keys: KeyLayout, version: str, window: Window, ttl_seconds: int) -> None:
    """Atomically make ``version``'s staging keys live; the replaced keys expire after ``ttl``."""
    live_meta_key = keys.live("meta")
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(live_meta_key)
                live_end = pipe.hget(live_meta_key, "data_end_ts")
                live_version = pipe.hget(live_meta_key, "version")
                _refuse_if_stale(None if live_end is None else float(live_end), window, live_version)
                live_exists = {s: pipe.exists(keys.live(s)) for s in STRUCTURES}
                staging_exists = {s: pipe.exists(keys.staging(version, s)) for s in STRUCTURES}
                pipe.multi()
                for structure in STRUCTURES:
                    if live_exists[structure]:
                        previous = keys.previous(live_version or "unknown", structure)
                        pipe.rename(keys.live(structure), previous)
                        pipe.expire(previous, ttl_seconds)
                    if staging_exists[structure]:
                        pipe.rename(keys.staging(version, structure), keys.live(structure))
                        pipe.persist(keys.live(structure))
                pipe.execute()
                return
            except redis.WatchError:
                log.info("live version changed while switching; checking again")


@dataclass(frozen=True)
class ShardResult:
    shard: int
    users: int  # users written (those with at least one recommendation)
    users_without_recommendations: int


def shard_users(n_users: int, shard: int, shards: int) -> np.ndarray:
    """Contiguous, balanced user index ranges: shard ``i`` of ``shards``."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in [0, {shards})")
    bounds = np.linspace(0, n_users, shards + 1).astype(np.int64)
    return np.arange(bounds[shard], bounds[shard + 1], dtype=np.int32)


def _window_and_version(matrix_dir: Path, params: PipelineParams) -> tuple[Window, str]:
    window = Window.from_dict(json.loads((matrix_dir / "manifest.json").read_text())["window"])
    return window, version_name(window, params)


def _staging_keys(keys: KeyLayout, version: str) -> list[str]:
    return [keys.staging(version, structure) for structure in STRUCTURES]


def _ids(path: Path) -> pa.Array:
    return pq.read_table(path, columns=["id"])["id"].combine_chunks()


def prepare_publish(
    settings: Settings, matrix_dir: Path, model_dir: Path, params: PipelineParams, progress: bool = False
) -> str:
    """Refuse a stale run early, clear this version's staging keys, and stage the per-product
    structures (similar products, top buys). Returns the version name."""
    window, version = _window_and_version(matrix_dir, params)
    keys, client = layout(settings), redis_client(settings)
    _refuse_if_stale(_live_data_end(client, keys), window, client.hget(keys.live("meta"), "version"))
    client.delete(*_staging_keys(keys, version))

    items_table = pq.read_table(matrix_dir / "items.parquet")
    items = items_table.to_pandas()
    top_lists = _top_buys(items, params.top_buys_n, id_codec(items["id"].tolist()))
    if not top_lists[TOP_BUYS_KEY_ALL]["top_buys"]:
        raise EmptyResultError("no active product for the top buys list; nothing published")
    blocked = inactive_items(matrix_dir)
    active = np.flatnonzero(items["active"].to_numpy(dtype=bool)).astype(np.int32)
    model = als_model(*load_factors(model_dir / "full.npz"))
    similar = similar_items(model, active, params.similar_n, blocked, progress="similar" if progress else None)

    item_ids = items_table["id"].combine_chunks()
    item_tokens = json_id_tokens(item_ids)
    has_similar = similar[:, 0] >= 0
    owners = pa.array(active[has_similar])
    _write_hash(
        client,
        keys.staging(version, "similar_products"),
        pc.take(item_ids, owners),
        json_list_objects(
            "product_id", pc.take(item_tokens, owners), "similar_products", item_tokens, similar[has_similar]
        ),
    )
    _write_hash(
        client,
        keys.staging(version, "top_buys"),
        pa.array(list(top_lists), pa.string()),
        pa.array([_dumps(value) for value in top_lists.values()], pa.string()),
    )
    return version


def publish_shard(
    settings: Settings,
    matrix_dir: Path,
    model_dir: Path,
    params: PipelineParams,
    shard: int = 0,
    shards: int = 1,
    progress: bool = False,
) -> ShardResult:
    """Top-N for one shard of the users into the version's staging hash. Idempotent: a rerun
    writes the same fields again."""
    _, version = _window_and_version(matrix_dir, params)
    keys, client = layout(settings), redis_client(settings)
    user_ids = _ids(matrix_dir / "users.parquet")
    users = shard_users(len(user_ids), shard, shards)
    recs, _ = recommend_top_n(
        als_model(*load_factors(model_dir / "full.npz")),
        users,
        sp.load_npz(matrix_dir / "exclude.npz").tocsr(),
        params.top_n,
        inactive_items(matrix_dir),
        progress=f"recommend {shard + 1}/{shards}" if progress else None,
    )
    has_recs = recs[:, 0] >= 0
    owners, lists = users[has_recs], recs[has_recs]
    # tokens of all users, not just this shard's: whether ids are published as numbers is decided
    # over every id, so all shards agree
    user_tokens, item_tokens = json_id_tokens(user_ids), json_id_tokens(_ids(matrix_dir / "items.parquet"))
    key = keys.staging(version, "user_recs")
    written = 0
    for start in range(0, len(owners), PAYLOAD_BATCH):
        batch = pa.array(owners[start : start + PAYLOAD_BATCH])
        payloads = json_list_objects(
            "user_id", pc.take(user_tokens, batch), "recommended_products", item_tokens,
            lists[start : start + PAYLOAD_BATCH],
        )
        written += _write_hash(client, key, pc.take(user_ids, batch), payloads)
    return ShardResult(shard=shard, users=written, users_without_recommendations=int((~has_recs).sum()))


def finish_publish(
    settings: Settings,
    matrix_dir: Path,
    model_dir: Path,
    eval_report: Path,
    params: PipelineParams,
    shard_results: list[ShardResult],
    shards: int,
    artifacts_key: str | None = None,
) -> PublishResult:
    """Check that every shard and structure is complete, then switch the version live at once.
    ``artifacts_key``: the run's folder in the shared artifact store, for readers on other hosts."""
    window, version = _window_and_version(matrix_dir, params)
    keys, client = layout(settings), redis_client(settings)
    try:
        done = sorted(result.shard for result in shard_results)
        if done != list(range(shards)):
            raise EmptyResultError(f"version {version}: shards {done} finished, expected 0..{shards - 1}; not switching")
        users = sum(result.users for result in shard_results)
        if users == 0:
            raise EmptyResultError("no user got a single recommendation (are all products inactive?); nothing published")
        _verify_staging(client, keys, version, {"user_recs": users})
        counts = {
            "users": users,
            "users_without_recommendations": sum(r.users_without_recommendations for r in shard_results),
            "products_with_similar": client.hlen(keys.staging(version, "similar_products")),
            "top_buys_lists": client.hlen(keys.staging(version, "top_buys")),
            "shards": shards,
        }
        evaluation = json.loads(eval_report.read_text())
        meta = {
            "version": version,
            "data_start": window.start.isoformat(),
            "data_end": window.end.isoformat(),
            "data_end_ts": repr(window.end.timestamp()),
            "published_at": datetime.now(UTC).isoformat(),
            "model_path": str((model_dir / "full.npz").resolve()),
            "matrix_dir": str(matrix_dir.resolve()),
            "metrics": _dumps({"model": evaluation["model"], "popularity": evaluation["popularity"]}),
            "params": _dumps(params.to_dict()),
            "counts": _dumps(counts),
        }
        if artifacts_key is not None:
            meta["artifacts_key"] = artifacts_key
        client.hset(keys.staging(version, "meta"), mapping=meta)
        client.expire(keys.staging(version, "meta"), STAGING_TTL_SECONDS)
        switch_live(client, keys, version, window, settings.previous_version_ttl_seconds)
    except BaseException:
        # a failed publish leaves nothing behind (live is untouched); if Redis itself is gone,
        # the staging TTL cleans up instead
        with suppress(redis.RedisError):
            client.delete(*_staging_keys(keys, version))
        raise
    log.info("published version %s live: %s", version, counts)
    return PublishResult(
        version=version,
        users=counts["users"],
        users_without_recommendations=counts["users_without_recommendations"],
        products_with_similar=counts["products_with_similar"],
    )


def publish(
    settings: Settings,
    matrix_dir: Path,
    model_dir: Path,
    eval_report: Path,
    params: PipelineParams,
    shards: int = 1,
    progress: bool = False,
    artifacts_key: str | None = None,
) -> PublishResult:
    """The whole publish in one process: prepare, every shard, switch (the DAG maps the shards)."""
    prepare_publish(settings, matrix_dir, model_dir, params, progress)
    results = [publish_shard(settings, matrix_dir, model_dir, params, i, shards, progress) for i in range(shards)]
    return finish_publish(settings, matrix_dir, model_dir, eval_report, params, results, shards, artifacts_key)


def _top_buys(items, n: int, item_out: Callable[[str], int | str]) -> dict[str, dict]:
    """Most bought active products (ties by distinct users), overall and per category."""
    ranked = items[items["active"]].sort_values(["buyers", "popularity", "id"], ascending=[False, False, True])
    lists = {TOP_BUYS_KEY_ALL: {"category": None, "top_buys": [item_out(i) for i in ranked["id"].head(n)]}}
    for category, group in ranked.dropna(subset=["category"]).groupby("category", sort=True):
        lists[top_buys_field(category)] = {"category": category, "top_buys": [item_out(i) for i in group["id"].head(n)]}
    return lists


def _verify_staging(client: redis.Redis, keys: KeyLayout, version: str, written: dict[str, int]) -> None:
    for structure, expected in written.items():
        found = client.hlen(keys.staging(version, structure))
        if found != expected:
            raise EmptyResultError(
                f"staging {structure} of version {version} holds {found} entries, expected {expected}; "
                "not switching live"
            )
