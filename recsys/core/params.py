"""Pipeline parameters: one validated dataclass shared by the CLI, the DAG Params form and tests."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from recsys.core.errors import InputError

DEFAULT_EVENT_WEIGHTS: dict[str, float] = {
    "purchase": 4.0,
    "add_to_cart": 2.0,
    "view": 1.0,
    "rating": 1.0,
}

# params holding lists (event types, model families): tuples in the dataclass, lists in JSON
LIST_PARAMS = ("exclude_event_types", "relevant_event_types", "negative_event_types", "basket_event_types", "models")
MODEL_FAMILIES = ("als", "bpr", "item_knn", "ease", "mult_dae", "blend")  # recsys.ml.families (core cannot import ml)
# families whose settings are ``family_params`` (ALS's are fields of their own; a blend's weight is
# chosen in every run)
TUNABLE_FAMILY_PARAMS = ("bpr", "item_knn", "ease")
TUNE_REPEATS = 3  # fits per tuning trial (seeds seed, seed + 1, ...) of a family with randomness

# What a variant of an A/B test (recsys.core.experiments) may override, by what it costs. Every
# field of PipelineParams is in exactly one group (tests/core/test_experiment_definitions.py):
# - serve-time params shape a user's list at publish from the run's model: no retrain;
SERVE_TIME_PARAMS = frozenset({"top_n", "diversity_lambda", "ann_scoring", "ann_min_items", "new_arrival_slots"})
# - training params make train fit one extra model for the variant, on the run's matrix;
TRAINING_PARAMS = frozenset({"factors", "regularization", "alpha", "iterations", "seed", "models", "family_params"})
# - data params change the window or the matrix every variant's model is fitted on and every
#   user's exclusions: one matrix per run, so a variant cannot have its own;
DATA_PARAMS = frozenset({
    "lookback_days", "holdout_days", "event_weights", "half_life_days", "confidence_scaling", "max_value",
    "max_invalid_fraction", "exclude_event_types", "negative_event_types", "relevant_event_types",
})
# - run-wide params are the same for every user: product pages (similar products, bought
#   together, top buys), the evaluation and its quality gate.
RUN_WIDE_PARAMS = frozenset({
    "similar_n", "top_buys_n", "basket_event_types", "bought_together_n", "bought_together_min_support", "k",
    "min_lift", "max_map_drop",
})


@dataclass(frozen=True)
class PipelineParams:
    # window
    lookback_days: int = 90
    holdout_days: int = 7
    # matrix
    event_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_EVENT_WEIGHTS))
    half_life_days: float = 0.0  # 0 disables time decay
    confidence_scaling: str = "log"  # none | log | bm25, applied to summed weights
    max_value: float = 1000.0  # a quantity/rating above this is treated as a data error
    max_invalid_fraction: float = 0.2  # more bad rows than this fails the extract
    exclude_event_types: tuple[str, ...] = ("purchase", "rating")  # never recommend these again
    # Negative feedback: the product is never recommended to that user again (extract reads these
    # types over the shop's whole history), and the (user, product) pair counts not at all in
    # training, so a return cancels the purchase it returns (measured: docs/quality.md#negative-feedback)
    negative_event_types: tuple[str, ...] = ("dislike", "return", "not_interested")
    relevant_event_types: tuple[str, ...] = ("purchase", "add_to_cart", "rating")  # hits in eval
    # ALS; defaults chosen on validation splits of three data sets (`recsys bench defaults`,
    # docs/quality.md): strong regularization and log-damped confidence beat implicit's own defaults
    factors: int = 64
    regularization: float = 40.0
    alpha: float = 4.0
    iterations: int = 15
    seed: int = 42
    # model families the train stage fits and chooses among (MAP@K on a random quarter of each
    # user's pre-holdout items; the holdout stays the gate's): als, bpr, item_knn, ease, mult_dae, blend (of
    # the two best). ALS keeps the settings above; EASE and item-kNN skip a catalogue over 20k
    # products (recsys.ml.families). ALS alone by default: a run trains and explains what it did
    # before; ["als", "ease", "blend"] is the suggested choice for a catalogue under 20k
    # (docs/quality.md#model-families)
    models: tuple[str, ...] = ("als",)
    # settings of the other families, e.g. {"ease": {"regularization": 500.0}} (the rest: the
    # family's defaults); left empty, recsys_tune's values are used (see use_tuned)
    family_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    # outputs
    top_n: int = 10
    k: int = 10
    similar_n: int = 10
    top_buys_n: int = 20
    # bought together (recsys.ml.co_purchase): a basket is one user's events of these types on one
    # UTC day; a pair needs this many shared baskets to count as complements
    basket_event_types: tuple[str, ...] = ("purchase",)
    bought_together_n: int = 10
    bought_together_min_support: int = 2
    # MMR diversity of the published user lists (recsys.ml.diversity): 0 = pure score order. 0.3
    # on MovieLens: catalogue coverage +11 % for -1.1 % MAP@10 (docs/quality.md#diversity-re-ranking)
    diversity_lambda: float = 0.3
    # approximate top-N (recsys.ml.ann) for publish's user lists: on, catalogues with at least
    # ann_min_items products a user's list may hold are scored against candidates an HNSW graph
    # over the item factors proposes, then ranked exactly. Off by default: exact is faster at 100k
    # products on 2 cores; at 1M (synthetic factors) the graph was 2.8x faster but recalled 0.87 of
    # the exact lists (docs/benchmarks.md#approximate-top-n-for-large-catalogues)
    ann_scoring: bool = False
    ann_min_items: int = 500_000
    # new arrivals (recsys.ml.content): the last slots of each user list (those no pin holds) go to
    # this many active products with no interaction in the window, the user's nearest by category,
    # attributes and name. 0 = off: no collaborative model can list such a product until it sells
    new_arrival_slots: int = 0
    # quality gate: model MAP@K must exceed popularity MAP@K * (1 + min_lift) and must not fall
    # more than max_map_drop (a fraction) below the live model's MAP@K
    min_lift: float = 0.0
    max_map_drop: float = 0.2

    def __post_init__(self) -> None:
        problems = []
        for name in (
            "lookback_days", "factors", "iterations", "top_n", "k", "similar_n", "top_buys_n", "bought_together_n",
            "bought_together_min_support", "ann_min_items",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 1 <= self.holdout_days < self.lookback_days:
            problems.append(
                f"holdout_days must be in [1, lookback_days={self.lookback_days}), got {self.holdout_days!r}"
            )
        if self.confidence_scaling not in ("none", "log", "bm25"):
            problems.append(f"confidence_scaling must be none, log or bm25, got {self.confidence_scaling!r}")
        for name in ("regularization", "alpha", "half_life_days", "min_lift"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.max_map_drop <= 1:
            problems.append(f"max_map_drop must be in [0, 1], got {self.max_map_drop!r}")
        if not 0 <= self.new_arrival_slots <= self.top_n:
            problems.append(f"new_arrival_slots must be in [0, top_n={self.top_n}], got {self.new_arrival_slots!r}")
        if not 0 <= self.diversity_lambda <= 1:
            problems.append(f"diversity_lambda must be in [0, 1], got {self.diversity_lambda!r}")
        if not isinstance(self.ann_scoring, bool):
            problems.append(f"ann_scoring must be true or false, got {self.ann_scoring!r}")
        if not 0 <= self.max_invalid_fraction <= 1:
            problems.append(f"max_invalid_fraction must be in [0, 1], got {self.max_invalid_fraction!r}")
        unknown_models = [name for name in self.models if name not in MODEL_FAMILIES]
        if unknown_models or not self.models:
            problems.append(f"models must name one or more of {', '.join(MODEL_FAMILIES)}, got {list(self.models)!r}")
        for family, settings in self.family_params.items():
            if family not in TUNABLE_FAMILY_PARAMS or not isinstance(settings, dict):
                problems.append(
                    f"family_params[{family!r}] must be a mapping of settings of one of {', '.join(TUNABLE_FAMILY_PARAMS)}, "
                    f"got {settings!r}"
                )
        if not self.basket_event_types:
            problems.append("basket_event_types must name at least one event type")
        if not self.event_weights:
            problems.append("event_weights must name at least one event type")
        for event_type, weight in self.event_weights.items():
            if not isinstance(weight, int | float) or weight <= 0:
                problems.append(f"event_weights[{event_type!r}] must be a number > 0, got {weight!r}")
        overlap = sorted(set(self.negative_event_types) & set(self.event_weights))
        if overlap:
            problems.append(
                f"negative_event_types and event_weights must not share an event type, both name: {', '.join(overlap)}"
            )
        if problems:
            raise InputError("invalid parameters: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PipelineParams:
        """Build from a loose mapping (Airflow Params, JSON); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown parameters: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        coerced = dict(values)
        for name in LIST_PARAMS:
            if name in coerced:
                coerced[name] = tuple(coerced[name])
        if "event_weights" in coerced:
            coerced["event_weights"] = {str(k): float(v) for k, v in coerced["event_weights"].items()}
        return cls(**coerced)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        for name in LIST_PARAMS:
            values[name] = list(values[name])
        return values

    def fingerprint(self) -> str:
        """Short stable hash: same params -> same artifact folder and Redis version name."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:10]
