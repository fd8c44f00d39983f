"""``recsys bench playcounts``: model selection on generated play counts with a long tail of items.

MovieLens-100k is a small, dense catalogue of 1,682 films with one rating per pair; a music or
media shop looks different: thousands of items whose popularity falls off as a power law, and a
play count per (user, item) that runs from 1 to hundreds. This generates such a data set offline
from a seed, then runs the same selection as ``recsys bench quality``: every family's grid fitted
on validation splits carved from train, the best chosen by mean validation nDCG@10, every family's
best then scored once on the test split next to popularity.

The generator: items fall in ``GENRES`` genres; item popularity is Zipf over the whole catalogue
(exponent ``ZIPF_EXPONENT``); each user likes one to three genres (a Dirichlet mix) and draws
most of their items from those genres, by popularity within them, the rest from the whole
catalogue by popularity; the number of items per user is log-normal; a play count is
1 + a geometric draw whose mean grows with how much the user likes the item's genre.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import scipy.sparse as sp
import typer
from rich.console import Console
from rich.table import Table

from recsys.bench.quality import BENCH_FAMILIES, VALIDATION_SPLITS  # the same selection as on MovieLens
from recsys.ml import selection
from recsys.ml.metrics import ranking_metrics
from recsys.ml.ranking import popularity_model, recommend_top_n
from recsys.ml.weighting import scale_confidence

GENRES = 10
ZIPF_EXPONENT = 1.5  # item popularity ∝ rank^-1.5
FROM_OWN_GENRES = 0.8  # share of a user's items drawn from the genres they like
CONFIDENCE = "log"  # the pipeline's default scaling of summed weights: log1p(play count)
K = 10


@dataclass(frozen=True)
class PlayCounts:
    matrix: sp.csr_matrix  # users × items, play counts (float32, every stored value >= 1)
    genre: np.ndarray  # per item

    def describe(self) -> dict:
        users, items = self.matrix.shape
        listeners = np.sort(np.diff(self.matrix.tocsc().indptr))[::-1]
        plays = self.matrix.data
        return {
            "users": users, "items": items, "pairs": int(self.matrix.nnz), "plays": int(plays.sum()),
            "density": round(self.matrix.nnz / (users * items), 5),
            "median_play_count": float(np.median(plays)), "max_play_count": float(plays.max()),
            # the long tail: how much of the listening the head holds, and how much of the catalogue is rare
            "pairs_on_top_1pct_items": round(float(listeners[: max(1, items // 100)].sum() / self.matrix.nnz), 3),
            "pairs_on_top_20pct_items": round(float(listeners[: max(1, items // 5)].sum() / self.matrix.nnz), 3),
            "items_with_under_5_listeners": round(float((listeners < 5).mean()), 3),
        }


def generate(users: int = 2_000, items: int = 2_000, seed: int = 7, mean_items_per_user: float = 30.0) -> PlayCounts:
    """The data set described in the module docstring; the same ``seed`` gives the same matrix."""
    rng = np.random.default_rng(seed)
    genre = rng.integers(0, GENRES, items)
    popularity = 1.0 / np.arange(1, items + 1) ** ZIPF_EXPONENT
    popularity = popularity[rng.permutation(items)]  # item ids say nothing about rank
    overall = popularity / popularity.sum()
    by_genre = [np.flatnonzero(genre == g) for g in range(GENRES)]
    within = [popularity[members] / popularity[members].sum() for members in by_genre]
    sigma = 0.8
    counts = np.clip(rng.lognormal(np.log(mean_items_per_user) - sigma**2 / 2, sigma, users).round(), 3, items // 4)
    rows, cols, plays = [], [], []
    for user, n in enumerate(counts.astype(int)):
        liked = rng.choice(GENRES, int(rng.integers(1, 4)), replace=False)
        taste = rng.dirichlet(np.ones(len(liked)))
        own = rng.binomial(n, FROM_OWN_GENRES)
        per_genre = rng.multinomial(own, taste)
        picks = [rng.choice(by_genre[g], min(m, len(by_genre[g])), replace=False, p=within[g])
                 for g, m in zip(liked, per_genre, strict=True)]
        chosen = np.unique(np.concatenate([*picks, rng.choice(items, n - own, replace=False, p=overall)]))
        affinity = np.zeros(GENRES)
        affinity[liked] = taste
        # plays per item: geometric (>= 1), mean 1 + extra, more for a genre the user likes more
        mean_extra = 2.0 + 30.0 * affinity[genre[chosen]]
        rows.append(np.full(len(chosen), user))
        cols.append(chosen)
        plays.append(rng.geometric(1.0 / (1.0 + mean_extra)))
    matrix = sp.csr_matrix(
        (np.concatenate(plays).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))), shape=(users, items)
    )
    return PlayCounts(matrix, genre)


def _popularity_metrics(split: selection.ValidationSplit, k: int) -> dict[str, float]:
    """Most-listened items (distinct listeners in the fit part) first, as the families are scored."""
    users = split.users()
    exclude = (split.fit if split.exclude is None else split.exclude).tocsr()
    listeners = np.diff(split.fit.tocsc().indptr).astype(np.float32)
    blocked = np.flatnonzero(listeners == 0)
    lists, _ = recommend_top_n(popularity_model(listeners, split.fit.shape[0]), users, exclude, k, blocked)
    metrics = ranking_metrics(lists, split.relevant.tocsr()[users], k,
                              n_catalog_items=max(1, split.fit.shape[1] - len(blocked)))
    return {name: getattr(metrics, name) for name in selection.METRICS}


def _split(raw_fit: sp.csr_matrix, relevant: sp.csr_matrix) -> selection.ValidationSplit:
    return selection.ValidationSplit(scale_confidence(raw_fit, CONFIDENCE), relevant, exclude=raw_fit)


def run_playcounts(data: PlayCounts, seed: int = 42, families: tuple[str, ...] = BENCH_FAMILIES) -> dict:
    """Test split (per user 75/25, by ``seed``), validation splits of train (seeds seed + 1, ...),
    selection on their mean nDCG@10, then every family's best fitted on train and scored on test."""
    test_split = selection.carve_validation(data.matrix, seed)
    train = test_split.fit
    splits = [_split(part.fit, part.relevant)
              for part in (selection.carve_validation(train, seed + 1 + index) for index in range(VALIDATION_SPLITS))]
    began = time.perf_counter()
    chosen = selection.select(splits, families, seed=seed, k=K)
    selection_seconds = time.perf_counter() - began
    test = _split(train, test_split.relevant)
    per_family = {}
    for name, candidate in chosen.best.items():
        began = time.perf_counter()
        model = selection.build(candidate.family, candidate.params).fit(test.fit, seed)
        per_family[name] = {
            "params": candidate.params, "validation": candidate.validation,
            "test": selection.validation_metrics(model, test, K),
            "fit_seconds": round(time.perf_counter() - began, 2),
        }
    popularity_validation = [_popularity_metrics(split, K) for split in splits]
    return {
        "data": data.describe(),
        "seed": seed,
        "chosen": chosen.chosen.family,
        "params": chosen.chosen.params,
        "selection_objective": chosen.objective,
        "families": per_family,
        "skipped": chosen.skipped,
        "popularity": {
            "validation": {name: float(np.mean([row[name] for row in popularity_validation])) for name in selection.METRICS},
            "test": _popularity_metrics(test, K),
        },
        "test_users": int(len(test.users())),
        "selection_seconds": round(selection_seconds, 2),
        "tried": len(chosen.tried),
    }


def _params_text(name: str, params: dict) -> str:
    if name == "blend":
        params = {"weight": params["weight"], "of": "+".join(part["family"] for part in params["parts"])}
    return " ".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}" for key, value in params.items())


def results_table(result: dict) -> Table:
    data = result["data"]
    table = Table(title=f"Generated play counts: {data['users']:,} users × {data['items']:,} items, {data['pairs']:,} "
                  f"pairs; validation = mean of {VALIDATION_SPLITS} splits of train, chosen by validation nDCG@{K}")
    for name in ("family", "params", "val MAP", f"val nDCG@{K}", f"val R@{K}", "val coverage", "test MAP",
                 f"test nDCG@{K}", f"test P@{K}", f"test R@{K}", "fit s"):
        table.add_column(name, justify="left" if name in ("family", "params") else "right")
    rows = [(name + (" *" if name == result["chosen"] else ""), _params_text(name, row["params"]), row["validation"],
             row["test"], f"{row['fit_seconds']:.2f}") for name, row in result["families"].items()]
    rows.append(("popularity", "", result["popularity"]["validation"], result["popularity"]["test"], ""))
    for name, params, validation, test, seconds in rows:
        table.add_row(name, params, f"{validation['map']:.4f}", f"{validation['ndcg']:.4f}",
                      f"{validation['recall']:.4f}", f"{validation['coverage']:.4f}", f"{test['map']:.4f}",
                      f"{test['ndcg']:.4f}", f"{test['precision']:.4f}", f"{test['recall']:.4f}", seconds)
    for name, why in result["skipped"].items():
        table.add_row(name, why, *[""] * 9)
    return table


def playcounts_command(
    users: Annotated[int, typer.Option(min=50, help="users to generate")] = 2_000,
    items: Annotated[int, typer.Option(min=50, help="items to generate")] = 2_000,
    data_seed: Annotated[int, typer.Option(help="seed of the generated data")] = 7,
    seed: Annotated[int, typer.Option(help="split, selection and model seed")] = 42,
    json_output: Annotated[bool, typer.Option("--json", help="end stdout with one JSON object")] = False,
) -> None:
    """Generate play counts with a long tail of items (offline, seeded) and choose a model family
    on them as ``recsys bench quality`` does on MovieLens."""
    data = generate(users, items, data_seed)
    Console(stderr=True).print(f"generated {data.describe()}; choosing among {', '.join(BENCH_FAMILIES)} ...")
    result = run_playcounts(data, seed)
    console = Console()
    console.print(results_table(result))
    console.print(f"chosen: {result['chosen']} {result['params']} (selection {result['selection_seconds']} s, "
                  f"{result['tried']} settings)")
    if json_output:
        sys.stdout.write(json.dumps(result) + "\n")
