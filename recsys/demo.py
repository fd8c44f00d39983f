"""Demo shop: a deterministic, realistic interaction log loaded into Postgres with COPY.

Products have power-law popularity and a category; users have latent tastes (a few favourite
categories plus a personal taste vector), so there is structure for ALS to find beyond plain
popularity. Each visit is a view; some views lead to add-to-cart, some carts to purchases.
Generation and loading go in user blocks, so memory stays bounded at any size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from recsys import db
from recsys.settings import Settings

CATEGORIES = (
    "books", "music", "games", "garden", "kitchen", "toys", "sports", "beauty",
    "outdoor", "office", "pets", "baby", "tools", "electronics", "fashion", "grocery",
)


@dataclass(frozen=True)
class DemoShop:
    users: int = 2_000
    products: int = 500
    days: int = 120
    visits_per_user: float = 25.0  # mean; per-user counts are log-normal (a few heavy users)
    taste_factors: int = 8
    inactive_share: float = 0.05
    seed: int = 42


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


def _item_model(shop: DemoShop, catalogue: pd.DataFrame, rng: np.random.Generator):
    # Zipf-like popularity over a random order of products
    ranks = rng.permutation(shop.products) + 1
    log_popularity = -1.0 * np.log(ranks)
    category_codes, categories = pd.factorize(catalogue["category"])
    item_taste = rng.normal(0, 1, (shop.products, shop.taste_factors))
    return log_popularity, category_codes, len(categories), item_taste


def generate_interactions(shop: DemoShop, end: datetime, block_users: int = 2_000):
    """Yield DataFrames (user_id, product_id, event_type, value, occurred_at) per user block."""
    rng = np.random.default_rng(shop.seed)
    catalogue = _catalogue(shop, rng)
    log_popularity, category_codes, n_categories, item_taste = _item_model(shop, catalogue, rng)
    start = end - timedelta(days=shop.days)
    span_seconds = shop.days * 86_400
    for first in range(0, shop.users, block_users):
        n = min(block_users, shop.users - first)
        block_rng = np.random.default_rng([shop.seed, first])
        favourite = block_rng.dirichlet(np.full(n_categories, 0.3), n)  # (n, categories)
        user_taste = block_rng.normal(0, 1, (n, shop.taste_factors))
        logits = (
            log_popularity[None, :]
            + np.log(favourite[:, category_codes] + 1e-3)
            + 0.6 * user_taste @ item_taste.T / np.sqrt(shop.taste_factors)
        )
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        visits = np.maximum(1, block_rng.lognormal(np.log(shop.visits_per_user) - 0.5, 1.0, n).astype(int))
        user_index = np.repeat(np.arange(n), visits)
        cumulative = probabilities.cumsum(axis=1)
        draws = block_rng.random(len(user_index))
        products = np.minimum(
            (cumulative[user_index] < draws[:, None]).sum(axis=1), shop.products - 1
        )
        seconds = block_rng.integers(0, span_seconds, len(user_index))
        carted = block_rng.random(len(user_index)) < 0.25
        bought = carted & (block_rng.random(len(user_index)) < 0.5)
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


def load_demo(settings: Settings, shop: DemoShop, end: datetime | None = None, progress: bool = False) -> DemoLoadResult:
    """Replace the shop tables in the configured schema with a generated demo shop."""
    end = end or datetime.now(UTC).replace(microsecond=0)
    db.create_schema(settings)
    total = 0
    with db.connect(settings) as conn, conn.cursor() as cur:
        cur.execute(db.sql_text(settings, "truncate_shop"))
        load_interactions = db.sql_text(settings, "load_interactions")
        blocks = generate_interactions(shop, end)
        with tqdm(total=shop.users, desc="demo data", unit="user", disable=not progress) as bar:
            for number, (catalogue, frame) in enumerate(blocks):
                if number == 0:
                    _copy_frame(cur, db.sql_text(settings, "load_products"), catalogue)
                _copy_frame(cur, load_interactions, frame)
                total += len(frame)
                bar.update(int(frame["user_id"].nunique()))
    return DemoLoadResult(
        products=shop.products, interactions=total, start=end - timedelta(days=shop.days), end=end
    )


def write_demo_parquet(shop: DemoShop, end: datetime, directory: Path) -> tuple[Path, Path]:
    """The demo shop as the extract stage would write it (for benchmarks that need no database)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys.extract import INTERACTIONS_SCHEMA

    directory.mkdir(parents=True, exist_ok=True)
    interactions_path, products_path = directory / "interactions.parquet", directory / "products.parquet"
    with pq.ParquetWriter(interactions_path, INTERACTIONS_SCHEMA) as writer:
        for catalogue, frame in generate_interactions(shop, end):
            frame = frame.assign(user_id=frame["user_id"].astype(str), product_id=frame["product_id"].astype(str))
            writer.write_table(pa.Table.from_pandas(frame, schema=INTERACTIONS_SCHEMA, preserve_index=False))
    products = catalogue.assign(product_id=catalogue["product_id"].astype(str))
    pq.write_table(pa.Table.from_pandas(products, preserve_index=False), products_path)
    return interactions_path, products_path
