"""Publish stage: top-N per user, similar products and top buys into Redis, switched live at once.

Order of work, so a failure at any point leaves the live version untouched:

1. refuse early if a fresher version is already live (backfills never go back in time);
2. compute everything; refuse an empty result;
3. write it under staging keys and check every count;
4. in one WATCH/MULTI/EXEC: re-check freshness, move the live keys to ``v:<old>`` with a TTL
   and rename the staging keys live. Readers see the old version or the new one, never a mix.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import redis
import scipy.sparse as sp

from recsys.errors import EmptyResultError, StaleVersionError
from recsys.evaluate import inactive_items
from recsys.extract import Window
from recsys.matrix import load_ids
from recsys.params import PipelineParams
from recsys.ranking import als_model, recommend_top_n, similar_items
from recsys.settings import Settings
from recsys.store import STRUCTURES, KeyLayout, layout, redis_client, top_buys_field
from recsys.train import load_factors

log = logging.getLogger(__name__)

HSET_CHUNK = 2_000
# staging keys of a publish that died half-way expire by themselves; the switch removes the TTL
STAGING_TTL_SECONDS = 6 * 3600
_CANONICAL_INT = re.compile(r"^-?(0|[1-9][0-9]{0,15})$")
_JS_SAFE_INT = 2**53
TOP_BUYS_KEY_ALL = top_buys_field(None)


def id_codec(ids: list[str]) -> Callable[[str], int | str]:
    """Ids go back as the shop stored them: integers if every id is a canonical integer (that a
    browser can hold exactly), strings otherwise ("007" stays "007")."""
    if all(_CANONICAL_INT.match(i) and abs(int(i)) < _JS_SAFE_INT for i in ids):
        return int
    return str


def version_name(window: Window, params: PipelineParams) -> str:
    """Same data window and params -> same version: reruns overwrite instead of duplicating."""
    return f"{window.end.astimezone(UTC):%Y%m%dT%H%M%SZ}-{params.fingerprint()}"


@dataclass(frozen=True)
class PublishResult:
    version: str
    users: int
    users_without_recommendations: int
    products_with_similar: int
    top_buys: int


def _chunks(pairs: Iterable[tuple[str, str]], size: int) -> Iterator[dict[str, str]]:
    iterator = iter(pairs)
    while chunk := dict(islice(iterator, size)):
        yield chunk


def _write_hash(client: redis.Redis, key: str, pairs: Iterable[tuple[str, str]]) -> int:
    written = 0
    pipe = client.pipeline(transaction=False)
    for number, chunk in enumerate(_chunks(pairs, HSET_CHUNK), start=1):
        pipe.hset(key, mapping=chunk)
        written += len(chunk)
        if number % 16 == 0:
            pipe.execute()
    pipe.expire(key, STAGING_TTL_SECONDS)
    pipe.execute()
    return written


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


def publish(
    settings: Settings,
    matrix_dir: Path,
    model_dir: Path,
    eval_report: Path,
    params: PipelineParams,
    progress: bool = False,
) -> PublishResult:
    manifest = json.loads((matrix_dir / "manifest.json").read_text())
    window = Window.from_dict(manifest["window"])
    version = version_name(window, params)
    keys = layout(settings)
    client = redis_client(settings)
    _refuse_if_stale(_live_data_end(client, keys), window, client.hget(keys.live("meta"), "version"))

    user_ids = load_ids(matrix_dir / "users.parquet")
    items = pq.read_table(matrix_dir / "items.parquet").to_pandas()
    item_ids = items["id"].tolist()
    user_out, item_out = id_codec(user_ids), id_codec(item_ids)
    blocked = inactive_items(matrix_dir)
    exclude = sp.load_npz(matrix_dir / "exclude.npz").tocsr()
    model = als_model(*load_factors(model_dir / "full.npz"))

    recs, _ = recommend_top_n(
        model, np.arange(len(user_ids)), exclude, params.top_n, blocked,
        progress="recommend" if progress else None,
    )
    has_recs = recs[:, 0] >= 0
    if not has_recs.any():
        raise EmptyResultError("no user got a single recommendation (are all products inactive?); nothing published")
    active = np.flatnonzero(items["active"].to_numpy(dtype=bool)).astype(np.int32)
    similar = similar_items(model, active, params.similar_n, blocked, progress="similar" if progress else None)
    top_lists = _top_buys(items, params.top_buys_n, item_out)
    if not top_lists[TOP_BUYS_KEY_ALL]["top_buys"]:
        raise EmptyResultError("no active product for the top buys list; nothing published")

    def user_pairs() -> Iterator[tuple[str, str]]:
        for index in np.flatnonzero(has_recs):
            row = recs[index]
            products = [item_out(item_ids[i]) for i in row[row >= 0]]
            user_id = user_ids[index]
            yield user_id, _dumps({"user_id": user_out(user_id), "recommended_products": products})

    def similar_pairs() -> Iterator[tuple[str, str]]:
        for item_index, row in zip(active, similar, strict=True):
            neighbours = [item_out(item_ids[i]) for i in row[row >= 0]]
            if neighbours:
                product_id = item_ids[item_index]
                yield product_id, _dumps({"product_id": item_out(product_id), "similar_products": neighbours})

    evaluation = json.loads(eval_report.read_text())
    staging_keys = [keys.staging(version, structure) for structure in STRUCTURES]
    client.delete(*staging_keys)
    try:
        counts = _write_staging(client, keys, version, user_pairs(), similar_pairs(), top_lists, has_recs)
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
        client.hset(keys.staging(version, "meta"), mapping=meta)
        client.expire(keys.staging(version, "meta"), STAGING_TTL_SECONDS)
        switch_live(client, keys, version, window, settings.previous_version_ttl_seconds)
    except BaseException:
        # a failed publish leaves nothing behind (live is untouched); if Redis itself is gone,
        # the staging TTL cleans up instead
        with suppress(redis.RedisError):
            client.delete(*staging_keys)
        raise
    log.info("published version %s live: %s", version, counts)
    return PublishResult(
        version=version,
        users=counts["users"],
        users_without_recommendations=counts["users_without_recommendations"],
        products_with_similar=counts["products_with_similar"],
        top_buys=len(top_lists[TOP_BUYS_KEY_ALL]["top_buys"]),
    )


def _write_staging(
    client: redis.Redis,
    keys: KeyLayout,
    version: str,
    user_pairs: Iterable[tuple[str, str]],
    similar_pairs: Iterable[tuple[str, str]],
    top_lists: dict[str, dict],
    has_recs: np.ndarray,
) -> dict[str, int]:
    """Write the staging hashes and check that each holds exactly what was written."""
    written = {
        "user_recs": _write_hash(client, keys.staging(version, "user_recs"), user_pairs),
        "similar_products": _write_hash(client, keys.staging(version, "similar_products"), similar_pairs),
        "top_buys": _write_hash(
            client,
            keys.staging(version, "top_buys"),
            ((field, _dumps(value)) for field, value in top_lists.items()),
        ),
    }
    _verify_staging(client, keys, version, written)
    return {
        "users": written["user_recs"],
        "users_without_recommendations": int((~has_recs).sum()),
        "products_with_similar": written["similar_products"],
        "top_buys_lists": written["top_buys"],
    }


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
