"""The live version in memory: factors, id maps, catalogue flags and exclusions of the version
Redis has live, loaded once per version (``load_live_model``) and shared read-only by requests.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import scipy.sparse as sp

from recsys.core import ids
from recsys.core.experiments import Experiment
from recsys.core.ids import IdTypes, id_out
from recsys.core.layout import EXCLUDE, FULL, ITEMS, USERS, published_artifacts
from recsys.core.params import PipelineParams
from recsys.core.rules import NO_RULES_FINGERPRINT, RuleSnapshot
from recsys.core.settings import Settings
from recsys.ml.families import Als, Recommender, load_model
from recsys.ml.ranking import als_model, top_buys_order
from recsys.ml.top_n import ItemVectors
from recsys.serving.schemas import ProductId

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveModel:
    """What ranking on request needs from one published version (read-only once built)."""

    version: str
    build: str  # the publish attempt's copy of the version in Redis (recsys.storage.keys)
    buckets: int  # its bucket count
    params: PipelineParams
    data_start: datetime
    model: Any  # implicit ALS around the version's factors (ALS versions; None for other families)
    user_index: dict[str, int]
    item_ids: list[str]
    item_index: dict[str, int]
    id_types: IdTypes
    active: np.ndarray  # bool per item
    category: np.ndarray  # object per item (None if uncategorised)
    categories: frozenset[str]  # categories with an active product: the ones with top buys
    popular: np.ndarray  # active item indices in top-buys order
    exclude: sp.csr_matrix  # who already has what in the window
    document_frequency: np.ndarray  # users per item in the window, for bm25 fold-ins
    confidence: sp.csr_matrix  # the weights the model was fitted on: what explanations decompose
    items: ItemVectors  # the item factors as ranking uses them (rank_lists)
    rules_fingerprint: str  # the ordering rules its published lists were made with
    # the rules (and inactive products) its publish applied; None for versions from before they were recorded
    published_rules: RuleSnapshot | None
    # the version's model, of whichever family (recsys.ml.families); None: ALS from ``model`` alone
    recommender: Recommender | None = None
    # the experiment the version serves (its meta's snapshot, salt included); None: none
    experiment: Experiment | None = None
    # per variant of the experiment: the version's params with the variant's overrides
    variant_params: dict[str, PipelineParams] = field(default_factory=dict)
    # variants with a model of their own (training params differ: Variant.trains_own_model), which
    # the API does not hold: their users' published lists are served as stored
    own_model_variants: frozenset[str] = frozenset()

    def user_vector(self, index: int) -> np.ndarray:
        """What a user of the version is ranked by: their factors, or (item-item families) their row."""
        if self.model is not None:
            return self.model.user_factors[index]
        return self.recommender.user_vectors(np.array([index]), self.confidence)[0]

    @property
    def unit_item_factors(self) -> np.ndarray:
        """Item factors scaled to length 1: cosines for diversity re-ranking."""
        return self.items.unit

    def product_out(self, index: int) -> ProductId:
        return id_out(self.id_types.product)(self.item_ids[index])

    def user_id_out(self, user_id: str) -> ProductId:
        """The form publish gives this id (requests were checked with :func:`_check_user_id`)."""
        return id_out(self.id_types.user)(user_id)


def load_live_model(meta: dict, settings: Settings) -> LiveModel:
    matrix_dir, model_path = published_artifacts(settings, meta)
    params = PipelineParams.from_dict(meta["params"])
    user_ids = pq.read_table(matrix_dir / USERS, columns=["id"])["id"].to_pylist()
    items = pq.read_table(matrix_dir / ITEMS).to_pandas()
    item_ids = items["id"].tolist()
    recommender = load_model(model_path)
    model = None
    if isinstance(recommender, Als):
        model = als_model(recommender.user_factors, recommender.item_factors)
        # the fold-in must solve the same least squares the version was trained with
        model.regularization, model.alpha = params.regularization, params.alpha
        # requests already run in parallel on the pool; implicit's own threads would oversubscribe
        model.num_threads = 1
        _ = model.YtY  # cached on the model: computed once here, not by the first concurrent fold-ins
    active = items["active"].to_numpy(dtype=bool)
    category = items["category"].to_numpy(dtype=object)
    # publish's top-buys order: distinct buyers, then distinct users, then id
    ranked = top_buys_order(items)
    exclude = sp.load_npz(matrix_dir / EXCLUDE).tocsr()
    full = sp.load_npz(matrix_dir / FULL).tocsr()
    experiment = Experiment.from_snapshot(meta["experiment"]) if meta.get("experiment") else None
    variant_params = {} if experiment is None else {v.name: v.pipeline_params(params) for v in experiment.variants}
    return LiveModel(
        version=meta["version"],
        build=meta["build"],
        buckets=int(meta["buckets"]),
        params=params,
        data_start=datetime.fromisoformat(meta["data_start"]),
        model=model,
        recommender=recommender,
        user_index={user_id: index for index, user_id in enumerate(user_ids)},
        item_ids=item_ids,
        item_index={item_id: index for index, item_id in enumerate(item_ids)},
        id_types=ids.of_version(meta, user_ids, item_ids),
        active=active,
        category=category,
        categories=frozenset(c for c in category[active] if c is not None),
        popular=ranked.index.to_numpy(dtype=np.int64),
        exclude=exclude,
        document_frequency=np.bincount(full.indices, minlength=full.shape[1]),
        confidence=full,
        items=recommender.items,
        # versions from before rules were published with none
        rules_fingerprint=meta.get("rules_fingerprint", NO_RULES_FINGERPRINT),
        published_rules=RuleSnapshot.from_dict(json.loads(meta["rules_snapshot"])) if "rules_snapshot" in meta else None,
        experiment=experiment,
        variant_params=variant_params,
        own_model_variants=frozenset(
            variant.name for variant in (experiment.variants if experiment else ()) if variant.trains_own_model(params)
        ),
    )
