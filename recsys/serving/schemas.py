"""The API's request and response models, and its limits on input (documented in the OpenAPI schema).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag

log = logging.getLogger(__name__)


MAX_N = 100
MAX_OFFSET = 1_000
MAX_EXCLUDE = 500
MAX_ID_LENGTH = 128
MAX_CART = 100  # products in one cart request
EXPLAIN_N = 3  # past products named per recommended product with explain=true
# printable ids without commas (``exclude`` is a comma-separated list of them)
ID_PATTERN = r"^[^\x00-\x1f\x7f,]+$"

Source = Literal["model", "fold_in", "popular"]
CartSource = Literal["bought_together", "similar", "popular"]
ProductId = int | str


class Recommendations(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "user_id": 101,
                    "version": "20261128T030000Z-888fd592bf",
                    "source": "model",
                    "category": None,
                    "offset": 0,
                    "n": 5,
                    "ranked_on_request": False,
                    "recommended_products": [45, 78, 12, 90, 33],
                }
            ]
        }
    )

    user_id: ProductId = Field(description="As the shop stores it: an integer if all ids are integers")
    version: str = Field(description="Live version the list comes from")
    source: Source = Field(
        description="model: the user was in the live model; fold_in: folded in on request from the "
        "user's recorded interactions; popular: top buys (no usable interactions)"
    )
    category: str | None = Field(description="Category filter applied, if any")
    offset: int
    n: int = Field(description="Page size asked for; the list is shorter only if no more products qualify")
    ranked_on_request: bool = Field(
        description="false: a page of the published list; true: ranked from the live factors for this request"
    )
    recommended_products: list[ProductId] = Field(description="Best first")


class Contribution(BaseModel):
    product_id: ProductId = Field(description="A product of the user's own history")
    contribution: float = Field(description="Its part of the recommended product's score")


class ProductExplanation(BaseModel):
    product_id: ProductId = Field(description="A recommended product")
    score: float = Field(description="Its score for this user's history: the sum of every past product's contribution")
    because: list[Contribution] = Field(
        description=f"The {EXPLAIN_N} past products that contribute most, largest first"
    )


class RuleInForce(BaseModel):
    rule_id: int
    rule: str = Field(description='e.g. "pin product 45 at rank 1 for segment vip"')


class RuleEffect(BaseModel):
    product_id: ProductId
    rank_before: int | None = Field(description="Rank in the list ranked without rules (null: not in it)")
    rank_after: int | None = Field(description="Rank in the answered list (null: not in it)")
    rule_id: int | None = Field(description="The rule behind it (null: inactive in the catalogue, or displaced)")
    kind: Literal["pin", "boost", "bury", "exclude", "inactive", "displaced", "excluded_at_publish"] = Field(
        description="excluded_at_publish: missing from a published list because the rules or catalogue of its "
        "publish left it out, though nothing in force now does; back after the next publish"
    )
    effect: str


class RulesTrace(BaseModel):
    rules_read: bool = Field(
        description="Whether this API process' last read of the rules from the shop database succeeded"
    )
    rules_source: Literal["database", "published", "none"] = Field(
        description="Where the applied rules come from: the API's own read of the shop database, or (while that "
        "read fails, or is older) the rules the live version was published with; none: no rules known"
    )
    rules_taken_at: str | None = Field(default=None, description="When the applied rules were read (ISO 8601)")
    published_with: str = Field(description="Fingerprint of the ordering rules the live version's lists were made with")
    in_force_fingerprint: str | None = None
    segments: list[str] = Field(default_factory=list, description="The user's segments that rules name")
    in_force: list[RuleInForce]
    applied: list[RuleEffect] = Field(description="Per product a rule moved, added or removed")


class UserRecommendations(Recommendations):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "user_id": 101, "version": "20261128T030000Z-888fd592bf", "source": "model", "category": None,
                    "offset": 0, "n": 2, "ranked_on_request": False, "recommended_products": [45, 78],
                    "recommendation_id": "5f0c6e2a9b8d4c17a3e1f0d2b4c6a8e9", "experiment": "diversity",
                    "variant": "diverse",
                    "explanations": [
                        {"product_id": 45, "score": 0.82, "because": [{"product_id": 3, "contribution": 0.51},
                                                                     {"product_id": 17, "contribution": 0.22}]},
                        {"product_id": 78, "score": 0.64, "because": [{"product_id": 17, "contribution": 0.40}]},
                    ],
                }
            ]
        }
    )

    recommendation_id: str = Field(
        description="This answer's id (32 hex digits, new each time): send it with the events the shopper makes "
        "from the list (POST /users/{id}/events), which is how an experiment counts clicks and purchases"
    )
    experiment: str | None = Field(
        description="The A/B test the user's list is served for (docs/experiments.md); null: the user is not in one"
    )
    variant: str | None = Field(description="The user's variant of that experiment; null with experiment")
    explanations: list[ProductExplanation] | None = Field(
        default=None,
        description="Only with explain=true: per recommended product, in list order, the user's past products "
        "that weigh most in its ALS score; empty for source popular (top buys have no score to decompose)",
    )
    rules: RulesTrace | None = Field(
        default=None, description="Only with debug=rules: the merchandising rules in force and what each did"
    )


class SimilarProducts(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"product_id": 45, "version": "20261128T030000Z-888fd592bf", "ranked_on_request": False,
                 "similar_products": [78, 12, 33]}
            ]
        }
    )

    product_id: ProductId
    version: str
    ranked_on_request: bool
    similar_products: list[ProductId] = Field(description="Most similar first (cosine on item factors)")


class TopBuys(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"category": "books", "version": "20261128T030000Z-888fd592bf", "ranked_on_request": False,
                 "top_buys": [45, 78, 12]}
            ]
        }
    )

    category: str | None
    version: str
    ranked_on_request: bool
    top_buys: list[ProductId] = Field(description="Most distinct buyers first; active products only")


class UserVariantInfo(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"user_id": 101, "experiment": "diversity", "variant": "diverse", "enrolled": True}]
        }
    )

    user_id: ProductId
    experiment: str | None = Field(description="The experiment the live version serves; null: none")
    variant: str | None = Field(
        description="The variant whose lists the user gets (the control when not enrolled); null without an experiment"
    )
    enrolled: bool = Field(
        description="Whether the user counts in the experiment: false outside the variants' shares, outside its "
        "running time, or in a variant a guardrail stopped (they get the control)"
    )


class ModelInfo(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "version": "20261128T030000Z-888fd592bf",
                    "data_start": "2026-08-30T03:00:00+00:00",
                    "data_end": "2026-11-28T03:00:00+00:00",
                    "published_at": "2026-11-28T03:12:41.120000+00:00",
                    "metrics": {"model": {"map": 0.081, "k": 10}, "popularity": {"map": 0.043, "k": 10}},
                    "params": {"top_n": 10, "event_weights": {"purchase": 4.0, "view": 1.0}},
                    "counts": {"users": 600, "users_without_recommendations": 0},
                    "fold_in_users": 3,
                }
            ]
        }
    )

    version: str
    data_start: str
    data_end: str
    published_at: str
    metrics: dict[str, Any] = Field(description="Holdout metrics of the model and of the popularity baseline")
    params: dict[str, Any]
    counts: dict[str, Any]
    id_types: dict[str, Any] | None = Field(
        default=None,
        description='How ids are published: {"user": "int" | "str", "product": ..., "source": {...}} '
        "(null for a version published before they were recorded)",
    )
    rules_fingerprint: str | None = Field(
        default=None,
        description="Digest of the merchandising ordering rules (pins, boosts, buries) the version's lists were "
        "made with (docs/rules.md); null for a version published before rules existed",
    )
    buckets: int | None = Field(
        default=None, description="Buckets the version's structures are split into in Redis (docs/scaling.md)"
    )
    model_family: dict[str, Any] | None = Field(
        default=None,
        description='The model family the version was made with and its params ({"family": "als" | "bpr" | '
        '"item_knn" | "ease" | "mult_dae" | "blend", "params": {...}}; a blend names its parts); null for a version '
        "published before families existed",
    )
    fold_in_users: int = Field(
        description="Users the API added to the live build's user_recs after the publish (events of users the "
        "version did not know): the user_recs entries are counts.users + fold_in_users"
    )


class Health(BaseModel):
    status: Literal["ok", "degraded"] = Field(
        description="degraded: answers are served, but the merchandising rules could not be read from the shop "
        "database: the rules the live version was published with (or the last read, if newer) apply"
    )
    version: str | None = None
    detail: str | None = Field(default=None, description="What is degraded")


class Problem(BaseModel):
    detail: str = Field(description="What was wrong")


def _iso_8601_text(value: Any) -> Any:
    """Timestamps are ISO 8601 text only: a number is never read as epoch seconds."""
    if not isinstance(value, str):
        raise ValueError("must be ISO 8601 text, e.g. 2026-11-28T10:15:00Z")
    try:
        return datetime.fromisoformat(value.upper())  # RFC 3339 allows a lower-case t and z
    except ValueError:
        raise ValueError(f"{value[:40]!r} is not an ISO 8601 date-time, e.g. 2026-11-28T10:15:00Z") from None


IsoTimestamp = Annotated[datetime, BeforeValidator(_iso_8601_text)]


def _product_id_kind(value: Any) -> str | None:
    if isinstance(value, bool):  # a bool is an int to Python, never a product id
        return None
    return "integer" if isinstance(value, int) else "string" if isinstance(value, str) else None


# an integer or a string, told apart by JSON type: errors name the branch ("body.product_id.string:
# String should match pattern ...") or, for any other type, say plainly what is expected
ProductIdIn = Annotated[
    Annotated[int, Field(ge=-(2**53), le=2**53), Tag("integer")]
    | Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN), Tag("string")],
    Discriminator(
        _product_id_kind, custom_error_type="product_id_type", custom_error_message="Input should be an integer or a string"
    ),
]
EventId = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH, pattern=ID_PATTERN)]
# what the API hands out with every list: 16 random bytes as 32 lower-case hex digits
RECOMMENDATION_ID_PATTERN = r"^[0-9a-f]{32}$"


class EventIn(BaseModel):
    # strict: JSON types as sent, so true is not product 1 and "3" is not the value 3
    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"product_id": 45, "event_type": "purchase", "value": 2, "timestamp": "2026-11-28T10:15:00Z",
                 "event_id": "order-9321-line-1", "recommendation_id": "5f0c6e2a9b8d4c17a3e1f0d2b4c6a8e9"}
            ]
        },
    )

    product_id: ProductIdIn
    event_type: str = Field(
        min_length=1, max_length=64,
        description="One of the live version's event_weights, or of its negative_event_types (default dislike, "
        "return, not_interested): negative feedback, which removes the product from the user's lists for good",
    )
    value: float | None = Field(
        default=None, ge=0, allow_inf_nan=False, description="Quantity or rating; null counts as 1"
    )
    timestamp: IsoTimestamp | None = Field(
        default=None,
        description="When it happened, ISO 8601 (UTC if no offset); default now. At most "
        "RECSYS_MAX_CLOCK_SKEW_SECONDS in the future and not older than the live version's lookback_days",
    )
    event_id: EventId | None = Field(
        default=None,
        description="The client's id of this event (or the Idempotency-Key header): a retried POST is stored once",
    )
    recommendation_id: str | None = Field(
        default=None, pattern=RECOMMENDATION_ID_PATTERN,
        description="The recommendation_id of the list the shopper followed to this product (from GET "
        "/users/{id}/recommendations): how an experiment counts clicks and purchases (docs/experiments.md)",
    )


class CartIn(BaseModel):
    # strict like EventIn: "3" is not the product 3 of an integer-id shop, nor 3 the page size "3"
    model_config = ConfigDict(
        strict=True, extra="forbid", json_schema_extra={"examples": [{"product_ids": [45, 78], "n": 5}]}
    )

    product_ids: list[ProductIdIn] = Field(
        min_length=1, max_length=MAX_CART,
        description=f"The cart's products (1..{MAX_CART}); products the live version does not know are "
        "ignored and listed in the answer's unknown_product_ids",
    )
    n: int = Field(default=10, ge=1, le=MAX_N, description=f"How many (1..{MAX_N})")


class CartRecommendations(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"version": "20261128T030000Z-888fd592bf", "n": 5, "product_ids": [45, 78], "unknown_product_ids": [],
                 "source": "bought_together", "sources": ["bought_together", "similar"],
                 "recommended_products": [12, 90, 33, 7, 61]}
            ]
        }
    )

    version: str = Field(description="Live version the lists come from")
    n: int = Field(description="How many were asked for; fewer only if no more active products qualify")
    product_ids: list[ProductId] = Field(description="The cart's products the live version knows, as it publishes them")
    unknown_product_ids: list[ProductId] = Field(description="The cart's products the live version does not know: ignored")
    source: CartSource = Field(description="Where the first product comes from: the largest vote for it (see sources)")
    sources: list[CartSource] = Field(
        description="Every source that contributed, in list order (for each product in turn, the sources "
        "that voted for it, largest vote first): bought_together (the cart products' published "
        "complements) and similar (their similar products), merged in one vote, then popular (top "
        "buys, last, while the list is short)"
    )
    recommended_products: list[ProductId] = Field(
        description="Best first; never a product of the cart nor an inactive one"
    )


class EventAccepted(Recommendations):
    event_stored: Literal[True] = True
    event_id: str | None = Field(description="The event's id, if the client gave one")
    replayed: bool = Field(description="true: this event_id was already stored (a retry); nothing new was written")


class EventPending(BaseModel):
    """The event is stored; the user's list is refreshed once Redis is reachable again."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"user_id": 101, "event_stored": True, "event_id": "order-9321-line-1", "replayed": False,
                 "list_refresh": "pending",
                 "detail": "stored, list refresh pending: Redis is unavailable; the list is refreshed as soon as Redis allows"}
            ]
        }
    )

    user_id: ProductId
    event_stored: Literal[True] = True
    event_id: str | None
    replayed: bool
    list_refresh: Literal["pending"] = "pending"
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "No API key, or an unknown one, in the X-API-Key header"},
    403: {"model": Problem, "description": "The API key's scope does not allow this (writes need a write key)"},
    404: {"model": Problem, "description": "Unknown user, product or category"},
    409: {"model": Problem, "description": "The event_id names another, already stored event"},
    413: {"model": Problem, "description": "The request body is over RECSYS_API_MAX_BODY_BYTES (default 64 KiB)"},
    422: {"model": Problem, "description": "Invalid input; the message says which"},
    429: {"model": Problem, "description": "This key's writes are over RECSYS_API_WRITE_RATE a minute; see Retry-After"},
    503: {"model": Problem, "description": "Redis or the database unreachable, or no version live yet"},
}
