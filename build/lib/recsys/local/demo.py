"""Demo shop: a deterministic, realistic interaction log loaded into Postgres with COPY.

Products have power-law popularity and a category; users have latent tastes (a few favourite
categories plus a personal taste vector), so there is structure for ALS to find beyond plain
popularity. Each visit is a view; some views lead to add-to-cart, some carts to purchases.

Sampling costs O(events), never O(users x products), so the same generator makes a 2,000-user
test shop and a 1,000,000-user x 100,000-product shop with tens of millions of events. Per visit:

1. a category from the user's Dirichlet preferences (cumulative sum + searchsorted);
2. ``CANDIDATES`` products of that category drawn by power-law popularity (cumulative
   popularity within the category + searchsorted);
3. one of them by the user's personal taste (Gumbel-max over taste x product factors): sampling
   importance resampling of popularity x exp(taste), the distribution the dense model wrote out.

Generation and loading go in user blocks of about ``EVENTS_PER_BLOCK`` events, so memory stays
bounded at any size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from recsys.core import db
from recsys.core.ids import IdTypes
from recsys.core.layout import INTERACTIONS, PRODUCTS
from recsys.core.settings import Settings

CATEGORIES = (
    "books", "music", "games", "garden", "kitchen", "toys", "sports", "beauty",
    "outdoor", "office", "pets", "baby", "tools", "electronics", "fashion", "grocery",
)
CART_RATE = 0.25  # of views
PURCHASE_RATE = 0.5  # of carts
ROWS_PER_VISIT = 1 + CART_RATE + CART_RATE * PURCHASE_RATE
CANDIDATES = 16  # popularity-drawn candidates per visit, one kept by taste
TASTE_STRENGTH = 0.6
EVENTS_PER_BLOCK = 1_000_000  # rows generated (and COPY-loaded) per block, about
MIN_BLOCK_USERS = 2_000


@dataclass(frozen=True)
class DemoShop:
    users: int = 2_000
    products: int = 500
    days: int = 120
    visits_per_user: float = 25.0  # mean; per-user counts are log-normal (a few heavy users)
    taste_factors: int = 8
    inactive_share: float = 0.05
    seed: int = 42
    # total rows wanted (views + carts + purchases); when set it overrides visits_per_user
    interactions: int | None = None
    popularity_exponent: float = 1.0  # Zipf exponent of product popularity

    @property
    def mean_visits(self) -> float:
        if self.interactions is None:
            return self.visits_per_user
        return max(self.interactions / (self.users * ROWS_PER_VISIT), 1e-3)

    @property
    def expected_interactions(self) -> int:
        return int(self.users * self.mean_visits * ROWS_PER_VISIT)


@dataclass(frozen=True)
class DemoLoadResult:
    products: int
    interactions: int
    start: datetime
    end: datetime


def _catalogue(shop: DemoShop, rng: np.random.Generator) -> pd.DataFrame:
    n_categories = min(len(CATEGORIES), max(2, shop.products // 30))
    return pd.DataFrame(
        {
            "product_id": np.arange(1, shop.products + 1),
            "name": [f"Product {i}" for i in range(1, shop.products + 1)],
            "category": np.asarray(CATEGORIES[:n_categories])[rng.integers(0, n_categories, shop.products)],
            "active": rng.random(shop.products) >= shop.inactive_share,
        }
    )


@dataclass(frozen=True)
class _ItemModel:
    n_categories: int
    category_start: np.ndarray  # (categories + 1,) offsets into ``members``
    members: np.ndarray  # product indices grouped by category
    member_cumulative: np.ndarray  # cumulative popularity within each category, normalised to 1
    category_mass: np.ndarray  # (categories,) total popularity per category, sums to 1
    item_taste: np.ndarray  # (products, taste_factors) float32
    keyed: np.ndarray  # member_cumulative + category number: one sorted array for searchsorted


def _item_model(shop: DemoShop, catalogue: pd.DataFrame, rng: np.random.Generator) -> _ItemModel:
    # Zipf-like popularity over a random order of products
    ranks = rng.permutation(shop.products) + 1
    popularity = ranks.astype(np.float64) ** -shop.popularity_exponent
    category_codes, categories = pd.factorize(catalogue["category"])
    item_taste = rng.normal(0, 1, (shop.products, shop.taste_factors)).astype(np.float32)
    order = np.argsort(category_codes, kind="stable")
    counts = np.bincount(category_codes, minlength=len(categories))
    start = np.concatenate([[0], np.cumsum(counts)])
    cumulative = np.empty(shop.products)
    mass = np.empty(len(categories))
    for c in range(len(categories)):
        chunk = popularity[order[start[c] : start[c + 1]]]
        mass[c] = chunk.sum()
        cumulative[start[c] : start[c + 1]] = np.cumsum(chunk) / mass[c]
    # each category's slice of ``cumulative`` is increasing in (0, 1]; adding the category number
    # makes the whole array increasing, so one searchsorted lands in the right category's slice
    keyed = cumulative + np.repeat(np.arange(len(categories)), counts)
    return _ItemModel(len(categories), start, order, cumulative, mass / mass.sum(), item_taste, keyed)


def _sample_products(
    model: _ItemModel,
    favourite: np.ndarray,
    user_taste: np.ndarray,
    user_index: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """One product index per visit; O(visits x (categories + candidates x factors))."""
    # category: user's preference x the category's share of popularity (as the dense model had it)
    preference = favourite * model.category_mass[None, :]
    cumulative = np.cumsum(preference / preference.sum(axis=1, keepdims=True), axis=1)
    draws = rng.random(len(user_index))
    category = (cumulative[user_index] < draws[:, None]).sum(axis=1)
    category = np.minimum(category, model.n_categories - 1)
    # candidates by popularity within the category: searchsorted on its cumulative popularity
    lo, hi = model.category_start[category], model.category_start[category + 1]
    u = rng.random((len(user_index), CANDIDATES))
    position = np.searchsorted(model.keyed, u + category[:, None], side="left")
    position = np.clip(position, lo[:, None], hi[:, None] - 1)
    candidates = model.members[position]  # (visits, CANDIDATES)
    # one candidate by taste (Gumbel-max of TASTE_STRENGTH * taste . item / sqrt(factors))
    taste = user_taste[user_index]
    scores = np.einsum("vf,vcf->vc", taste, model.item_taste[candidates]) * (
        TASTE_STRENGTH / np.sqrt(model.item_taste.shape[1])
    )
    scores += rng.gumbel(size=scores.shape)
    return candidates[np.arange(len(candidates)), scores.argmax(axis=1)]


def _block_users(shop: DemoShop) -> int:
    per_user = max(shop.mean_visits * ROWS_PER_VISIT, 1e-3)
    return max(MIN_BLOCK_USERS, int(EVENTS_PER_BLOCK / per_user))


def generate_interactions(shop: DemoShop, end: datetime, block_users: int | None = None):
    """Yield (catalogue, DataFrame of user_id, product_id, event_type, value, occurred_at) per
    user block; the same shop and end always give the same rows."""
    rng = np.random.default_rng(shop.seed)
    catalogue = _catalogue(shop, rng)
    model = _item_model(shop, catalogue, rng)
    start = end - timedelta(days=shop.days)
    span_seconds = shop.days * 86_400
    block_users = block_users or _block_users(shop)
    for first in range(0, shop.users, block_users):
        n = min(block_users, shop.users - first)
        block_rng = np.random.default_rng([shop.seed, first])
        favourite = block_rng.dirichlet(np.full(model.n_categories, 0.3), n) + 1e-3
        user_taste = block_rng.normal(0, 1, (n, shop.taste_factors)).astype(np.float32)
        visits = np.maximum(1, block_rng.lognormal(np.log(shop.mean_visits) - 0.5, 1.0, n).astype(np.int64))
        user_index = np.repeat(np.arange(n), visits)
        products = np.empty(len(user_index), dtype=np.int64)
        step = 200_000  # visits per sampling chunk: bounds the (visits x candidates x factors) temporaries
        for lo in range(0, len(user_index), step):
            part = slice(lo, lo + step)
            products[part] = _sample_products(model, favourite, user_taste, user_index[part], block_rng)
        seconds = block_rng.integers(0, span_seconds, len(user_index))
        carted = block_rng.random(len(user_index)) < CART_RATE
        bought = carted & (block_rng.random(len(user_index)) < PURCHASE_RATE)
        events = [
            ("view", np.ones(len(user_index), dtype=bool), 0, np.full(len(user_index), np.nan)),
            ("add_to_cart", carted, 60, np.ones(len(user_index))),
            ("purchase", bought, 300, block_rng.choice([1, 1, 1, 2, 3], len(user_index)).astype(float)),
        ]
        frames = []
        for event_type, mask, delay, value in events:
            frames.append(
                pd.DataFrame(
                    {
                        "user_id": first + user_index[mask] + 1,
                        "product_id": products[mask] + 1,
                        "event_type": event_type,
                        "value": value[mask],
                        "occurred_at": pd.to_datetime(
                            start.timestamp() + np.minimum(seconds[mask] + delay, span_seconds - 1), unit="s", utc=True
                        ),
                    }
                )
            )
        yield catalogue, pd.concat(frames, ignore_index=True).sort_values("occurred_at", kind="stable")


def _copy_frame(cursor, statement: str, frame: pd.DataFrame) -> None:
    buffer = io.StringIO()
    frame.to_csv(buffer, header=False, index=False, na_rep="", date_format="%Y-%m-%d %H:%M:%S%z")
    with cursor.copy(statement) as copy:
        copy.write(buffer.getvalue())


def _copy_interactions(cursor, statement: str, frame: pd.DataFrame) -> None:
    """Arrow's CSV writer (several times faster than pandas' at millions of rows): NULL value is
    an empty unquoted field, timestamps are ISO 8601 with a Z, both of which COPY csv reads."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    buffer = io.BytesIO()
    table = pa.Table.from_pandas(frame, preserve_index=False)
    pacsv.write_csv(table, buffer, pacsv.WriteOptions(include_header=False, quoting_style="needed"))
    with cursor.copy(statement) as copy:
        copy.write(buffer.getbuffer())


def load_demo(settings: Settings, shop: DemoShop, end: datetime | None = None, progress: bool = False) -> DemoLoadResult:
    """Replace the shop tables in the configured schema with a generated demo shop."""
    end = end or datetime.now(UTC).replace(microsecond=0)
    db.create_schema(settings)
    total = 0
    with db.connect(settings) as conn, conn.cursor() as cur:
        cur.execute(db.sql_text(settings, "truncate_shop"))
        load_interactions = db.sql_text(settings, "load_interactions")
        blocks = generate_interactions(shop, end)
        with tqdm(
            total=shop.expected_interactions, desc="demo data", unit="row", unit_scale=True, disable=not progress
        ) as bar:
            for number, (catalogue, frame) in enumerate(blocks):
                if number == 0:
                    _copy_frame(cur, db.sql_text(settings, "load_products"), catalogue)
                _copy_interactions(cur, load_interactions, frame)
                total += len(frame)
                bar.update(len(frame))
    return DemoLoadResult(
        products=shop.products, interactions=total, start=end - timedelta(days=shop.days), end=end
    )


# the demo shop's ids are integers
DEMO_ID_TYPES = IdTypes("int", "int", {"user": "demo shop", "product": "demo shop"})


def write_demo_parquet(shop: DemoShop, end: datetime, directory: Path) -> tuple[Path, Path]:
    """The demo shop as the extract stage would write it (for benchmarks that need no database)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys.pipeline.extract import INTERACTIONS_SCHEMA

    directory.mkdir(parents=True, exist_ok=True)
    interactions_path, products_path = directory / INTERACTIONS, directory / PRODUCTS
    with pq.ParquetWriter(interactions_path, INTERACTIONS_SCHEMA) as writer:
        for catalogue, frame in generate_interactions(shop, end):  # noqa: B007 - the same catalogue each block
            frame = frame.assign(user_id=frame["user_id"].astype(str), product_id=frame["product_id"].astype(str))
            writer.write_table(pa.Table.from_pandas(frame, schema=INTERACTIONS_SCHEMA, preserve_index=False))
    products = catalogue.assign(product_id=catalogue["product_id"].astype(str))
    pq.write_table(pa.Table.from_pandas(products, preserve_index=False), products_path)
    return interactions_path, products_path
