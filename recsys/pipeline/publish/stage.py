"""Publish stage: top-N per user, similar products, bought together and top buys into Redis,
switched live at once.

Three steps of one publish *attempt*, so the per-user scoring can fan out over workers (the DAG
maps ``publish_shard``); a failure or a kill at any point leaves the live version untouched:

1. ``prepare_publish``: take the version's owner lock, sweep the builds of attempts that no
   longer run, refuse early if a fresher version is already live (backfills never go back in
   time), stage the per-product structures (similar products, bought together, top buys);
2. ``publish_shard`` (once per shard, any order, idempotent): score a contiguous range of users
   and write their lists into the attempt's build;
3. ``finish_publish``: stage again whatever was lost since (Redis restart, staging TTL), refuse an
   empty result, then switch (``recsys.storage.builds.switch``): every bucket checked against its
   recorded counts, then one script on one slot that checks ownership and freshness and moves
   the live pointer to the build.

Every key of the attempt's build carries the attempt id and gets its TTL with its first write.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from recsys.core.errors import EmptyResultError, PublishConflictError, StaleVersionError
from recsys.core.experiments import Experiment, Variant, get_experiment
from recsys.core.ids import IdType, IdTypes, id_out
from recsys.core.layout import EXCLUDE, EXPERIMENT, FACTORS_FULL, FULL, ITEMS, MANIFEST, USERS
from recsys.core.params import PipelineParams
from recsys.core.rules import RuleSnapshot, take_snapshot
from recsys.core.settings import Settings
from recsys.core.window import Window, version_name
from recsys.ml.ann import ItemIndexes, rank_lists_approximately
from recsys.ml.co_purchase import bought_together
from recsys.ml.families import USER_CHUNK, FactorModel, Recommender, StoredRows, load_model
from recsys.ml.merchandising import Merchandising, place_pins
from recsys.ml.ranking import top_buys_order
from recsys.ml.top_n import blocked_mask, rank_lists
from recsys.pipeline.matrix import inactive_items, load_baskets, matrix_id_types
from recsys.pipeline.new_products import catalogue_ids, load_new_products
from recsys.pipeline.publish.new_arrivals import with_content_similar, with_new_arrivals
from recsys.pipeline.train import checked_model_build
from recsys.storage import builds
from recsys.storage.builds import Build
from recsys.storage.connection import UNAVAILABLE, sync_client
from recsys.storage.keys import BUCKETED, KeyLayout, top_buys_field
from recsys.storage.locks import VersionOwner
from recsys.storage.reads import live_version

log = logging.getLogger(__name__)

# users ranked at once when their factors are read from the model file (8 MiB of 64 float32 factors)
STORED_USERS_CHUNK = 32_768
# the bucketed structures prepare_publish stages (each one's entry count per bucket is in the
# attempt's manifest), besides the top buys
PRODUCT_STRUCTURES = ("similar_products", "bought_together")
# printable ASCII except '"' and '\\': JSON-quoting such an id is just adding the quotes
_NEEDS_NO_ESCAPE = r"^[\x20\x21\x23-\x5b\x5d-\x7e]*$"
TOP_BUYS_KEY_ALL = top_buys_field(None)


def json_id_tokens(ids: pa.Array, id_type: IdType) -> pa.Array:
    """Each id as the JSON text ``json.dumps(id_out(id_type)(id))`` writes, computed column-wise:
    publishing a million users must not cost a million Python calls. With ``int``, every id is a
    canonical integer already (the extract refused the others)."""
    ids = ids.cast(pa.string())
    if id_type == "int" or len(ids) == 0:
        return ids
    quoted = pc.binary_join_element_wise('"', ids, '"', "")
    needs_escape = pc.invert(pc.match_substring_regex(ids, _NEEDS_NO_ESCAPE))
    if not pc.any(needs_escape).as_py():
        return quoted
    escaped = pa.array([json.dumps(i) for i in ids.filter(needs_escape).to_pylist()], pa.string())
    return pc.replace_with_mask(quoted, needs_escape, escaped)


def json_list_objects(
    owner_key: str, owner_tokens: pa.Array, list_key: str, member_tokens: pa.Array, lists: np.ndarray,
    tails: pa.Array | None = None,
) -> pa.Array:
    """``{"<owner_key>":<owner>,"<list_key>":[<member>,...]<tail>}`` per row of ``lists``
    (indices into ``member_tokens``; -1 marks an empty slot), in compact ``json.dumps`` form.
    ``tails``: per row, more fields as compact JSON text starting with a comma, or ""."""
    filled = lists >= 0
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum(filled.sum(axis=1), out=offsets[1:])
    members = pc.take(member_tokens, pa.array(lists[filled], pa.int32()))
    joined = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), members), ",")
    if tails is None:
        return pc.binary_join_element_wise(f'{{"{owner_key}":', owner_tokens, f',"{list_key}":[', joined, "]}", "")
    return pc.binary_join_element_wise(
        f'{{"{owner_key}":', owner_tokens, f',"{list_key}":[', joined, "]", tails, "}", ""
    )


@dataclass
class PhaseTimings:
    """Seconds a publish spends per phase: ``scoring`` (users' top-N), ``similar`` (similar
    products and bought together), ``writing`` (JSON payloads and HSETs). Pass one in to measure (the speed benchmark)."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@dataclass(frozen=True)
class PublishResult:
    version: str
    users: int
    users_without_recommendations: int
    products_with_similar: int
    products_with_bought_together: int

    @classmethod
    def from_counts(cls, version: str, counts: dict) -> PublishResult:
        """The result as a build's meta records it (``counts``)."""
        return cls(version, counts["users"], counts["users_without_recommendations"],
                   counts["products_with_similar"], counts["products_with_bought_together"])


def new_attempt() -> str:
    """A publish attempt's id: it names the attempt's staging keys and holds the version's lock."""
    return uuid.uuid4().hex[:12]


def _owner(settings: Settings, staging: _Staging) -> VersionOwner:
    return VersionOwner(
        staging.client, staging.keys, staging.version, staging.attempt, settings.publish_lock_ttl_seconds,
        settings.publish_lock_wait_seconds,
    )


def _dumps(value: dict) -> str:
    return json.dumps(value, separators=(",", ":"))


def _refuse_if_stale(client, keys: KeyLayout, window: Window) -> None:
    live_end = builds.live_data_end(client, keys)
    if live_end is not None and live_end > window.end.timestamp():
        raise StaleVersionError(
            f"live version {live_version(client, keys)} has data up to "
            f"{datetime.fromtimestamp(live_end, UTC).isoformat()}, newer than this run's "
            f"{window.end.isoformat()}; not replacing it"
        )


def _abandon(staging: _Staging) -> None:
    """Best effort after a failed attempt: its keys and lock go now instead of at their TTL."""
    with suppress(*UNAVAILABLE):
        staging.build.drop()
        VersionOwner(staging.client, staging.keys, staging.version, staging.attempt, 1, 0).release()


@dataclass(frozen=True)
class ShardResult:
    shard: int
    users: int  # users written (those with at least one recommendation)
    users_without_recommendations: int
    attempt: str


def shard_users(n_users: int, shard: int, shards: int) -> np.ndarray:
    """Contiguous, balanced user index ranges: shard ``i`` of ``shards``."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not in [0, {shards})")
    bounds = np.linspace(0, n_users, shards + 1).astype(np.int64)
    return np.arange(bounds[shard], bounds[shard + 1], dtype=np.int32)


def _window_and_version(matrix_dir: Path, params: PipelineParams) -> tuple[Window, str]:
    window = Window.from_dict(json.loads((matrix_dir / MANIFEST).read_text())["window"])
    return window, version_name(window, params)


def _ids(path: Path) -> pa.Array:
    return pq.read_table(path, columns=["id"])["id"].combine_chunks()


@dataclass(frozen=True)
class _Staging:
    """One attempt's build and where it comes from."""

    settings: Settings
    client: Any
    keys: KeyLayout
    version: str
    attempt: str
    matrix_dir: Path
    model_dir: Path
    params: PipelineParams
    model_build: str  # the model build this attempt publishes: every step must see the same one
    id_types: IdTypes
    timings: PhaseTimings

    @cached_property
    def build(self) -> Build:
        return Build(self.client, self.keys, self.version, self.attempt)

    def rules(self) -> RuleSnapshot:
        """The rules this attempt applies: taken once, when it stages the product structures, so
        every shard applies the same ones (taken again only if Redis lost the manifest)."""
        recorded = self.client.hget(self.keys.manifest(self.build.name), "rules")
        if recorded is None:
            # steps of one attempt may take it at once (parallel shards after a Redis restart):
            # the first recorded wins, and every step applies that one
            recorded = self.build.record_once("rules", _dumps(take_snapshot(self.settings).to_dict()))
        return RuleSnapshot.from_dict(json.loads(recorded))

    def experiment(self) -> ServedExperiment | None:
        """The experiment this attempt serves: the one train snapshotted in the model folder, with
        its stop state as Postgres has it when the attempt first asks, and that time, at which
        every user is assigned. Recorded once in the manifest (as the rules are), so every shard
        splits the users alike, a retried one too."""
        recorded = self.client.hget(self.keys.manifest(self.build.name), "experiment")
        if recorded is None:
            recorded = self.build.record_once("experiment", _dumps(_experiment_now(self.settings, self.model_dir)))
        return ServedExperiment.from_record(json.loads(recorded))

    def merchandising(self, items_table: pa.Table) -> Merchandising:
        return Merchandising(
            self.rules(), items_table["id"].to_pylist(), items_table["category"].to_numpy(zero_copy_only=False)
        )

    def manifest(self) -> dict[str, str]:
        """What the attempt has staged, after checking it staged it from this step's model build."""
        manifest = self.build.manifest()
        if manifest.get("model_build", self.model_build) != self.model_build:
            raise PublishConflictError(
                f"version {self.version}: the model changed since publish attempt {self.attempt} began "
                "(another run of the same window retrained it?); publish again"
            )
        return manifest


@dataclass(frozen=True)
class ServedExperiment:
    """An experiment as a publish attempt serves it: users are assigned at ``assigned_at``."""

    experiment: Experiment
    assigned_at: datetime

    @classmethod
    def from_record(cls, record: dict | None) -> ServedExperiment | None:
        if record is None:
            return None
        return cls(Experiment.from_snapshot(record), datetime.fromisoformat(record["assigned_at"]))

    def record(self) -> dict:
        return {**self.experiment.snapshot(), "assigned_at": self.assigned_at.isoformat()}

    def positions(self, user_ids: list[str]) -> np.ndarray:
        """Per user, the position of the variant they are enrolled in; -1 for users not enrolled."""
        if not self.experiment.running(self.assigned_at):
            return np.full(len(user_ids), -1, dtype=np.int32)
        position = {variant.name: index for index, variant in enumerate(self.experiment.variants)}
        assigned = (self.experiment.assign(user_id, self.assigned_at) for user_id in user_ids)
        return np.fromiter(
            (position[a.variant] if a.enrolled else -1 for a in assigned), dtype=np.int32, count=len(user_ids)
        )

    def tails(self) -> pa.Array:
        """The fields an entry ends with, by variant position + 1 (0: not enrolled, no fields)."""
        name = json.dumps(self.experiment.name)
        return pa.array(
            [""] + [f',"experiment":{name},"variant":{json.dumps(v.name)}' for v in self.experiment.variants], pa.string()
        )


def _experiment_now(settings: Settings, model_dir: Path) -> dict | None:
    """The record of the experiment train snapshotted (None if none), with the stops Postgres
    holds now: a variant a guardrail or `recsys experiments stop` stopped since train gets the control."""
    path = model_dir / EXPERIMENT
    if not path.exists():
        return None
    trained = Experiment.from_snapshot(json.loads(path.read_text()))
    stored = get_experiment(settings, trained.name)
    stops = {variant.name: variant for variant in stored.variants}
    applied = replace(
        trained, stopped_at=stored.stopped_at, stop_reason=stored.stop_reason,
        variants=tuple(
            replace(v, stopped_at=stops[v.name].stopped_at, stop_reason=stops[v.name].stop_reason) for v in trained.variants
        ),
    )
    return ServedExperiment(applied, datetime.now(UTC)).record()


def _stage_products(staging: _Staging, owner: VersionOwner, progress: bool = False) -> None:
    """Similar products, bought together and top buys into the attempt's build; their entries
    per bucket into its manifest."""
    matrix_dir, params = staging.matrix_dir, staging.params
    items_table = pq.read_table(matrix_dir / ITEMS)
    items = items_table.to_pandas()
    # exclude rules without a segment hold for every page; segment ones only for users' lists
    kept_out = staging.merchandising(items_table).for_segments(frozenset()).blocked
    top_lists = _top_buys(items[~kept_out], params.top_buys_n, id_out(staging.id_types.product))
    if not top_lists[TOP_BUYS_KEY_ALL]["top_buys"]:
        raise EmptyResultError("no active product the rules allow for the top buys list; nothing published")
    blocked = np.union1d(inactive_items(matrix_dir), np.flatnonzero(kept_out)).astype(np.int32)
    # an out-of-stock product's page still shows alternatives: owners are the catalogue's active ones
    active = np.flatnonzero(items["active"].to_numpy(dtype=bool)).astype(np.int32)
    model = load_model(staging.model_dir / FACTORS_FULL, with_users=False)  # similar products need the items alone
    with staging.timings.phase("similar"):
        # one similarity search serves both: the similar lists and the fill of sparse bought-together lists
        similar = model.similar_items(
            active, max(params.similar_n, params.bought_together_n), blocked_mask(model.n_items, blocked),
            progress="similar" if progress else None,
        )
        together = bought_together(
            load_baskets(matrix_dir), active, similar, params.bought_together_n,
            params.bought_together_min_support, blocked,
        )
        similar = similar[:, : params.similar_n]
        new = load_new_products(matrix_dir)
        # new products get content-based lists; short collaborative ones are filled up by content
        owners, similar = with_content_similar(new, staging.rules(), active, similar, blocked)

    item_ids = catalogue_ids(matrix_dir)
    build = staging.build
    for structure in PRODUCT_STRUCTURES:
        build.clear(structure)
    with staging.timings.phase("writing"):
        item_tokens = json_id_tokens(item_ids, staging.id_types.product)

        def write_lists(structure: str, owners: np.ndarray, lists: np.ndarray) -> np.ndarray:
            """``{"product_id": <id>, "<structure>": [...]}`` of every owner with a list."""
            has_list = lists[:, 0] >= 0
            owners, lists = owners[has_list], lists[has_list]

            def payloads(rows: np.ndarray) -> pa.Array:
                return json_list_objects("product_id", pc.take(item_tokens, pa.array(owners[rows])), structure,
                                         item_tokens, lists[rows])

            return build.write_entries(structure, pc.take(item_ids, pa.array(owners)), payloads, owner)

        counts = {"similar_products": write_lists("similar_products", owners, similar)}
        counts["bought_together"] = write_lists("bought_together", active, together)
        top_buys = build.write_top_buys({field: _dumps(value) for field, value in top_lists.items()})
    build.record({
        "model_build": staging.model_build, "top_buys": top_buys,
        **{structure: json.dumps(per_bucket.tolist()) for structure, per_bucket in counts.items()},
    })


@dataclass(frozen=True)
class _Scoring:
    """Users of a shard scored alike: with ``params`` on ``model``; ``rows`` index the shard."""

    rows: np.ndarray
    params: PipelineParams
    model: Recommender


def _scorings(
    staging: _Staging, served: ServedExperiment | None, positions: np.ndarray, model: Recommender
) -> list[_Scoring]:
    """The shard's users by how they are scored: users not enrolled (and enrolled users of a
    variant without overrides) with the run's params on the run's model; each variant's users
    with its params, on its own model if train fitted it one (``train_variants``)."""
    variants: list[Variant] = [] if served is None else list(served.experiment.variants)
    own = [index for index, variant in enumerate(variants) if variant.params and (positions == index).any()]
    base_rows = np.flatnonzero(~np.isin(positions, own))
    scorings = [_Scoring(base_rows, staging.params, model)] if len(base_rows) else []
    if own:
        trained = json.loads((staging.model_dir / MANIFEST).read_text()).get("variants", {})
        for index in own:
            variant = variants[index]
            variant_model = (
                load_model(staging.model_dir / trained[variant.name]["file"]) if variant.name in trained else model
            )
            scorings.append(_Scoring(np.flatnonzero(positions == index), variant.pipeline_params(staging.params), variant_model))
    return scorings


def _stage_shard(staging: _Staging, owner: VersionOwner, shard: int, shards: int, progress: bool = False) -> ShardResult:
    """Top-N of one shard of the users into the attempt's build; its entries per bucket into the
    manifest. Users enrolled in the served experiment get their variant's lists, naming it."""
    matrix_dir = staging.matrix_dir
    user_ids = _ids(matrix_dir / USERS).cast(pa.string())
    users = shard_users(len(user_ids), shard, shards)
    shard_ids = pc.take(user_ids, pa.array(users))
    served = staging.experiment()
    positions = (
        np.full(len(users), -1, dtype=np.int32) if served is None else served.positions(shard_ids.to_pylist())
    )
    recs = _score_shard(staging, users, shard_ids, positions, served, f"recommend {shard + 1}/{shards}" if progress else None)
    has_recs = recs[:, 0] >= 0
    owners, lists = users[has_recs], recs[has_recs]
    tails = None if served is None else pc.take(served.tails(), pa.array(positions[has_recs] + 1))
    with staging.timings.phase("writing"):
        owner_ids = pc.take(user_ids, pa.array(owners))
        user_tokens = json_id_tokens(owner_ids, staging.id_types.user)
        item_tokens = json_id_tokens(catalogue_ids(matrix_dir), staging.id_types.product)

        def payloads(rows: np.ndarray) -> pa.Array:
            taken = pa.array(rows)
            return json_list_objects("user_id", pc.take(user_tokens, taken), "recommended_products", item_tokens,
                                     lists[rows], None if tails is None else pc.take(tails, taken))

        written = staging.build.write_entries("user_recs", owner_ids, payloads, owner)
    without = int((~has_recs).sum())
    enrolled = {} if served is None else {
        variant.name: int((positions[has_recs] == index).sum()) for index, variant in enumerate(served.experiment.variants)
    }
    staging.build.record({
        f"shard:{shard}": int(written.sum()), f"shard:{shard}:buckets": json.dumps(written.tolist()),
        f"shard:{shard}:empty": without, f"shard:{shard}:enrolled": json.dumps(enrolled),
    })
    return ShardResult(shard=shard, users=int(written.sum()), users_without_recommendations=without, attempt=staging.attempt)


def _score_shard(
    staging: _Staging, users: np.ndarray, shard_ids: pa.Array, positions: np.ndarray, served: ServedExperiment | None,
    progress: str | None,
) -> np.ndarray:
    """The top-N of a shard's ``users`` (``shard_ids``), each enrolled one (``positions``) with
    its variant's params and model. Its own function: the models, the matrices and the rules it
    loads are gone before the lists are written."""
    matrix_dir = staging.matrix_dir
    # Arrow's allocator keeps what earlier steps freed (25 MiB after the product structures at 300k
    # users): back to the system before the scoring, publish's peak
    pa.default_memory_pool().release_unused()
    # the user factors stay in the file: read a chunk of users at a time as they are ranked
    model = load_model(staging.model_dir / FACTORS_FULL, users_on_disk=True)
    exclude = sp.load_npz(matrix_dir / EXCLUDE).tocsr()
    scorings = _scorings(staging, served, positions, model)
    # the item-item families read a user's row of the matrix they were fitted on; new arrivals
    # are picked by what a user interacted with: read once for every group that needs it
    item_item = not all(isinstance(s.model, FactorModel) for s in scorings)
    arrivals = any(s.params.new_arrival_slots for s in scorings)
    full = sp.load_npz(matrix_dir / FULL).tocsr() if item_item or arrivals else None
    fitted_on = full if item_item else None
    new = load_new_products(matrix_dir) if arrivals else None
    merchandising = staging.merchandising(pq.read_table(matrix_dir / ITEMS, columns=["id", "category"]))
    inactive = inactive_items(matrix_dir)
    indexes = {id(s.model): ItemIndexes(s.model.items.factors) for s in scorings if isinstance(s.model, FactorModel)}
    # variants' lists may be longer: shorter ones are padded with empty slots (-1)
    recs = np.full((len(users), max([s.params.top_n for s in scorings], default=1)), -1, dtype=np.int32)
    with staging.timings.phase("scoring"):
        for scoring in scorings:
            everyone = len(scoring.rows) == len(users)  # keeps the shard's one contiguous range of users
            group_ids, group = (shard_ids, users) if everyone else (pc.take(shard_ids, pa.array(scoring.rows)), users[scoring.rows])
            lists = _ruled_top_n(
                merchandising, scoring.model, fitted_on, group_ids, group, exclude, inactive, scoring.params,
                progress=progress, indexes=indexes.get(id(scoring.model)),
            )
            if scoring.params.new_arrival_slots:
                lists = with_new_arrivals(
                    staging.rules(), merchandising, new, full, group, group_ids.to_pylist(), lists,
                    scoring.params.new_arrival_slots,
                )
            recs[scoring.rows, : lists.shape[1]] = lists
    return recs


def _ruled_top_n(
    merchandising: Merchandising, model: Recommender, fitted_on: sp.csr_matrix | None, user_ids: pa.Array,
    users: np.ndarray, exclude: sp.csr_matrix, inactive: np.ndarray, params: PipelineParams, progress: str | None,
    indexes: ItemIndexes | None = None,
) -> np.ndarray:
    """Each user's top-N with the rules of their segments (``rank_lists``, as the API ranks on
    request): excluded products blocked, scores multiplied by boosts and buries, pins placed last.
    With ``params.ann_scoring``, a segment whose allowed products reach ``params.ann_min_items``
    is ranked on the candidates of an HNSW index over the item factors (``recsys.ml.ann``):
    ``indexes``, the model's, shared between calls, else built here."""
    groups: dict[frozenset[str], list[int]] = {}
    if merchandising.segment_names:
        for row, user_id in enumerate(user_ids.to_pylist()):
            groups.setdefault(merchandising.segments_of(user_id), []).append(row)
    else:
        groups[frozenset()] = list(range(len(users)))
    recs = np.full((len(users), params.top_n), -1, dtype=np.int32)
    items = model.items
    # HNSW graphs (built when a segment first needs one) index factor models' item factors only
    if indexes is None and isinstance(model, FactorModel):
        indexes = ItemIndexes(items.factors)
    for segments, rows in groups.items():
        rules = merchandising.for_segments(segments)
        blocked = rules.blocked.copy()
        blocked[inactive] = True
        group, group_exclude = users[rows], exclude[users[rows]]
        # one chunk's vectors at a time (a generator): user factors on disk, dense rows of the matrix
        chunk = USER_CHUNK if not isinstance(model, FactorModel) else (
            STORED_USERS_CHUNK if isinstance(model.user_factors, StoredRows) else max(1, len(group))
        )
        chunks = (
            (part, _user_vectors(model, group[part], fitted_on))
            for part in (slice(lo, min(lo + chunk, len(group))) for lo in range(0, len(group), chunk))
        )
        approximate = (
            indexes is not None and params.ann_scoring and len(blocked) - int(blocked.sum()) >= params.ann_min_items
        )
        rank = partial(rank_lists_approximately, indexes) if approximate else rank_lists
        lists = np.concatenate([
            rank(
                vectors, items, params.top_n + len(rules.pins), exclude=group_exclude[part], blocked=blocked,
                factors=rules.factors, diversity_lambda=params.diversity_lambda, first=params.top_n, progress=progress,
            )
            for part, vectors in chunks
        ]) if len(group) else np.full((0, params.top_n + len(rules.pins)), -1, np.int32)
        owned = group_exclude[:, [pin.item for pin in rules.pins]].toarray() > 0 if rules.pins else None
        recs[rows] = place_pins(lists, rules.pins, params.top_n, owned)
    return recs


def _user_vectors(model: Recommender, users: np.ndarray, fitted_on: sp.csr_matrix | None) -> np.ndarray:
    if isinstance(model, FactorModel) and users[-1] - users[0] + 1 == len(users):
        return model.user_factors[users[0] : users[-1] + 1]  # a shard's one range: a view (or one read)
    return model.user_vectors(users, fitted_on)


def _staging(
    settings: Settings, matrix_dir: Path, model_dir: Path, params: PipelineParams, attempt: str,
    timings: PhaseTimings | None = None,
) -> tuple[_Staging, Window]:
    window, version = _window_and_version(matrix_dir, params)
    model_build = checked_model_build(matrix_dir, model_dir) or ""
    staging = _Staging(
        settings, sync_client(settings.require_redis_url), KeyLayout(settings.redis_prefix, settings.redis_buckets),
        version, attempt, matrix_dir, model_dir, params, model_build, matrix_id_types(matrix_dir), timings or PhaseTimings(),
    )
    return staging, window


def _sweep(settings: Settings, staging: _Staging) -> None:
    builds.sweep(
        staging.client, staging.keys, settings.previous_version_ttl_seconds, settings.publish_lock_ttl_seconds,
        settings.publish_lock_wait_seconds,
    )


def prepare_publish(
    settings: Settings, matrix_dir: Path, model_dir: Path, params: PipelineParams, attempt: str, progress: bool = False,
    timings: PhaseTimings | None = None,
) -> str:
    """Take the version's lock for ``attempt``, sweep orphaned builds, refuse a stale run early,
    and stage the per-product structures (similar products, bought together, top buys). Returns
    the version."""
    staging, window = _staging(settings, matrix_dir, model_dir, params, attempt, timings)
    with _owner(settings, staging) as owner:
        _sweep(settings, staging)  # whatever the freshness check below decides
        try:
            _refuse_if_stale(staging.client, staging.keys, window)
            staging.build.drop()
            staging.build.register()
            _stage_products(staging, owner, progress)
            staging.experiment()  # its stop state as of the attempt's start, for every shard
        except (StaleVersionError, EmptyResultError):
            _abandon(staging)
            raise
    return staging.version


def publish_shard(
    settings: Settings,
    matrix_dir: Path,
    model_dir: Path,
    params: PipelineParams,
    attempt: str,
    shard: int = 0,
    shards: int = 1,
    progress: bool = False,
    timings: PhaseTimings | None = None,
) -> ShardResult:
    """Top-N for one shard of the users into the attempt's build. Idempotent: a retry writes the
    same fields again."""
    staging, _ = _staging(settings, matrix_dir, model_dir, params, attempt, timings)
    with _owner(settings, staging) as owner:
        staging.manifest()  # checks the model build
        return _stage_shard(staging, owner, shard, shards, progress)


def _expected(manifest: dict[str, str], shards: int) -> dict[str, np.ndarray] | None:
    """Entries per bucket of each bucketed structure, as the manifest records them; None if a
    product structure or a shard is not recorded at all."""
    if any(structure not in manifest for structure in PRODUCT_STRUCTURES):
        return None
    expected = {structure: np.asarray(json.loads(manifest[structure])) for structure in PRODUCT_STRUCTURES}
    expected["user_recs"] = sum(
        (np.asarray(json.loads(manifest[f"shard:{shard}:buckets"])) for shard in range(shards)
         if f"shard:{shard}:buckets" in manifest),
        start=np.zeros(len(expected["similar_products"]), dtype=np.int64),
    )
    return expected


def _complete_staging(staging: _Staging, owner: VersionOwner, shards: int) -> dict[str, str]:
    """The attempt's manifest once every structure it records is staged in full. What is gone
    (Redis restarted, the staging TTL passed between tasks, or a sweep expired the build of an
    attempt whose lock had lapsed) is staged again, so a retried ``finish_publish`` succeeds
    without rerunning the tasks before it."""
    manifest, build = staging.manifest(), staging.build
    expected = _expected(manifest, shards)
    found = {state.bucket: state.found for state in build.states()}
    lost = expected is None or any(
        found[bucket][structure] != expected[structure][bucket]
        for structure in PRODUCT_STRUCTURES for bucket in range(staging.keys.buckets)
    ) or staging.client.hlen(staging.keys.top_buys(build.name)) != int(manifest.get("top_buys", -1))
    if lost:
        log.warning("version %s: staged product structures lost (Redis restart, staging TTL or a sweep?); "
                    "staging again", staging.version)
        _stage_products(staging, owner)
    missing = [shard for shard in range(shards) if f"shard:{shard}:buckets" not in manifest]
    if not missing and expected is not None and any(
        found[bucket]["user_recs"] != expected["user_recs"][bucket] for bucket in range(staging.keys.buckets)
    ):
        missing = list(range(shards))  # entries lost, records kept: which shard lost them is unknown
    if missing:
        log.warning("version %s: user shards %s not staged in full (Redis restart, staging TTL or a sweep?); "
                    "scoring them again", staging.version, missing)
        for shard in missing:
            _stage_shard(staging, owner, shard, shards)
    return staging.manifest()


def finish_publish(
    settings: Settings,
    matrix_dir: Path,
    model_dir: Path,
    eval_report: Path,
    params: PipelineParams,
    attempt: str,
    shard_results: list[ShardResult],
    shards: int,
    artifacts_key: str | None = None,
) -> PublishResult:
    """Check that every shard and structure is complete, then switch the version live at once.
    ``artifacts_key``: the run's folder in the shared artifact store, for readers on other hosts."""
    staging, window = _staging(settings, matrix_dir, model_dir, params, attempt)
    version = staging.version
    done = sorted(result.shard for result in shard_results)
    if done != list(range(shards)):
        _abandon(staging)
        raise EmptyResultError(f"version {version}: shards {done} finished, expected 0..{shards - 1}; not switching")
    foreign = sorted({result.attempt for result in shard_results} - {attempt})
    if foreign:
        raise PublishConflictError(
            f"version {version}: shard results of publish attempts {foreign}, not of {attempt}; not switching"
        )
    live = builds.pointer(staging.client, staging.keys)
    if live is not None and live["build"] == staging.build.name:
        log.info("version %s is live already (this attempt switched it; a retry)", version)
        return _result(staging)
    with _owner(settings, staging) as owner:
        try:
            manifest = _complete_staging(staging, owner, shards)
            expected = _expected(manifest, shards)
            users = sum(int(manifest[f"shard:{shard}"]) for shard in range(shards))
            if users == 0:
                raise EmptyResultError(
                    "no user got a single recommendation (are all products inactive?); nothing published"
                )
            counts = {
                "users": users,
                "users_without_recommendations": sum(int(manifest[f"shard:{s}:empty"]) for s in range(shards)),
                "products_with_similar": int(expected["similar_products"].sum()),
                "products_with_bought_together": int(expected["bought_together"].sum()),
                "top_buys_lists": int(manifest["top_buys"]),
                "shards": shards,
            }
            evaluation = json.loads(eval_report.read_text())
            meta = {
                "version": version,
                "attempt": attempt,
                "build": staging.build.name,
                "data_start": window.start.isoformat(),
                "data_end": window.end.isoformat(),
                "data_end_ts": repr(window.end.timestamp()),
                "published_at": datetime.now(UTC).isoformat(),
                "model_path": str((model_dir / FACTORS_FULL).resolve()),
                "model_family": _dumps(json.loads((model_dir / MANIFEST).read_text()).get("model", {"family": "als"})),
                "matrix_dir": str(matrix_dir.resolve()),
                "metrics": _dumps({"model": evaluation["model"], "popularity": evaluation["popularity"]}),
                "params": _dumps(params.to_dict()),
                "counts": _dumps(counts),
                "id_types": _dumps(staging.id_types.to_dict()),
                "rules_fingerprint": staging.rules().ordering_fingerprint(),
                # what the API applies while it cannot read the rules itself: never less than this
                "rules_snapshot": _dumps(staging.rules().to_dict()),
                "experiment": _dumps(_applied_experiment(staging, manifest, shards)),
                "variant_models": _dumps(json.loads((model_dir / MANIFEST).read_text()).get("variants", {})),
            }
            if artifacts_key is not None:
                meta["artifacts_key"] = artifacts_key
            staging.build.write_infos({structure: expected[structure] for structure in BUCKETED})
            staging.build.write_meta(meta)
            owner.check()
            builds.switch(
                staging.client, staging.build,
                data_end_ts=window.end.timestamp(),
                latest_allowed_end_ts=time.time() + settings.max_clock_skew_seconds,
                keep_versions=settings.keep_versions,
                kept_ttl_seconds=settings.previous_version_ttl_seconds,
                lock_ttl_seconds=settings.publish_lock_ttl_seconds,
                lock_wait_seconds=settings.publish_lock_wait_seconds,
            )
        except (StaleVersionError, EmptyResultError):
            _abandon(staging)  # retrying cannot change the outcome
            raise
    staging.build.forget_manifest()
    log.info("published version %s live: %s", version, counts)
    return _result(staging)


def _applied_experiment(staging: _Staging, manifest: dict[str, str], shards: int) -> dict | None:
    """The meta's ``experiment``: the snapshot as the attempt applied it (stops included), when
    it assigned the users, and how many users with a list each variant enrolled."""
    served = staging.experiment()
    if served is None:
        return None
    enrolled = {variant.name: 0 for variant in served.experiment.variants}
    for shard in range(shards):
        for name, count in json.loads(manifest[f"shard:{shard}:enrolled"]).items():
            enrolled[name] += count
    return {**served.record(), "enrolled_users": enrolled}


def _result(staging: _Staging) -> PublishResult:
    return PublishResult.from_counts(
        staging.version, json.loads(staging.client.hget(staging.keys.meta(staging.build.name), "counts"))
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
    timings: PhaseTimings | None = None,
) -> PublishResult:
    """The whole publish in one process, as one attempt: prepare, every shard, switch (the DAG maps
    the shards). A failed attempt removes its build and lock (their TTLs cover a kill)."""
    attempt = new_attempt()
    try:
        prepare_publish(settings, matrix_dir, model_dir, params, attempt, progress, timings)
        results = [
            publish_shard(settings, matrix_dir, model_dir, params, attempt, shard, shards, progress, timings)
            for shard in range(shards)
        ]
        return finish_publish(settings, matrix_dir, model_dir, eval_report, params, attempt, results, shards, artifacts_key)
    except BaseException:
        staging, _ = _staging(settings, matrix_dir, model_dir, params, attempt)
        if (builds.pointer(staging.client, staging.keys) or {}).get("build") != staging.build.name:
            _abandon(staging)
        raise


def _top_buys(items, n: int, item_out: Callable[[str], int | str]) -> dict[str, dict]:
    """Most bought active products (ties by distinct users), overall and per category."""
    ranked = top_buys_order(items)
    lists = {TOP_BUYS_KEY_ALL: {"category": None, "top_buys": [item_out(i) for i in ranked["id"].head(n)]}}
    for category, group in ranked.dropna(subset=["category"]).groupby("category", sort=True):
        lists[top_buys_field(category)] = {"category": category, "top_buys": [item_out(i) for i in group["id"].head(n)]}
    return lists
