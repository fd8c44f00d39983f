"""Choosing a model family on validation data: every enabled family's small grid of settings is
fitted on each validation split's fit part and scored on its held-out part (the same exclusions
and blocked items for all), the best settings per family kept, a blend of the two best families
tried at a few weights, and the best of them all by the mean objective over the splits chosen.

A fixed grid, fixed seeds and one BLAS thread (``recsys.ml.families``): two runs on one machine
choose the same model with the same numbers. A test split never comes here: the caller carves the
validation splits out of its training data.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from recsys.core.errors import InputError
from recsys.ml.families import FAMILIES, Blend, Recommender, make
from recsys.ml.metrics import ranking_metrics

log = logging.getLogger(__name__)

Objective = Literal["map", "ndcg", "precision", "recall"]
METRICS = ("map", "ndcg", "precision", "recall", "coverage")

# Settings tried per family: around implicit's and the papers' defaults, sized so the whole grid
# fits MovieLens-100k in about a minute on one core (docs/quality.md#model-families)
GRIDS: dict[str, list[dict[str, Any]]] = {
    "als": [
        {"factors": factors, "regularization": regularization, "alpha": 4.0, "iterations": 15}
        for factors in (64, 128) for regularization in (20.0, 40.0, 80.0)
    ],
    "bpr": [{"factors": 64, "learning_rate": 0.01, "regularization": 0.01, "iterations": 200}],
    "item_knn": [
        {"similarity": "bm25", "neighbours": neighbours} for neighbours in (100, 200, 400)
    ] + [{"similarity": "cosine", "neighbours": 200}],
    "ease": [{"regularization": regularization} for regularization in (100.0, 300.0, 500.0, 800.0)],
    # one setting: the slowest fit of the grid on MovieLens; latent 50-400, l2, epochs and dropout
    # were explored on validation (docs/quality.md#what-was-tried)
    "mult_dae": [{"latent": 100, "epochs": 100, "l2": 0.01, "keep": 0.5}],
}
BLEND_WEIGHTS = (0.5, 0.6, 0.7, 0.8, 0.9)  # of the better family; the other gets the rest


@dataclass(frozen=True)
class ValidationSplit:
    """One fit part (the weighted matrix the families fit on) and its held-out relevant items."""

    fit: sp.csr_matrix
    relevant: sp.csr_matrix
    exclude: sp.csr_matrix | None = None  # never listed per user; default: the fit part's items
    blocked_items: np.ndarray | None = None  # never listed for anyone (besides items unseen in fit)

    def users(self) -> np.ndarray:
        return np.flatnonzero(np.diff(self.relevant.tocsr().indptr) > 0)

    def blocked(self) -> np.ndarray | None:
        from recsys.ml.top_n import blocked_mask  # numba: only once a choice among families is scored

        unseen = np.flatnonzero(np.diff(self.fit.tocsc().indptr) == 0)
        items = unseen if self.blocked_items is None else np.union1d(unseen, self.blocked_items)
        return blocked_mask(self.fit.shape[1], items)


@dataclass(frozen=True)
class Candidate:
    family: str
    params: dict[str, Any]  # a blend: its weight and its parts' descriptions
    validation: dict[str, float]  # METRICS, mean over the splits
    seconds: float  # fitting and scoring, all splits


@dataclass(frozen=True)
class Selection:
    chosen: Candidate
    best: dict[str, Candidate]  # per family (and "blend"): its best settings
    tried: list[Candidate] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # family -> why it was left out
    objective: Objective = "ndcg"

    def to_dict(self) -> dict:
        def row(candidate: Candidate) -> dict:
            return {"family": candidate.family, "params": candidate.params, "validation": candidate.validation,
                    "seconds": round(candidate.seconds, 2)}

        return {
            "objective": self.objective,
            "chosen": row(self.chosen),
            "families": {name: row(candidate) for name, candidate in self.best.items()},
            "skipped": self.skipped,
            "tried": len(self.tried),
        }


def carve_validation(
    user_items: sp.csr_matrix, seed: int, ratio: float = 0.75, blocked_items: np.ndarray | None = None
) -> ValidationSplit:
    """A per-user random split of one matrix (the benchmark's protocol on a CSR): each user keeps
    floor(ratio × n) of their n items to fit on (a user with one item keeps it) and the rest are
    the relevant ones. Fixed by ``seed``."""
    user_items = user_items.tocsr()
    counts = np.diff(user_items.indptr)
    draws = np.random.default_rng(seed).random(user_items.nnz)
    rows = np.repeat(np.arange(user_items.shape[0]), counts)
    order = np.lexsort((draws, rows))  # by user, then by draw
    position = np.empty(user_items.nnz, dtype=np.int64)
    position[order] = np.arange(user_items.nnz) - np.repeat(user_items.indptr[:-1], counts)
    kept = position < np.maximum(np.floor(ratio * counts), 1)[rows]
    coo = user_items.tocoo()
    fit = sp.csr_matrix((coo.data[kept], (coo.row[kept], coo.col[kept])), shape=user_items.shape, dtype=np.float32)
    held = ~kept
    relevant = sp.csr_matrix((np.ones(int(held.sum()), np.float32), (coo.row[held], coo.col[held])),
                             shape=user_items.shape)
    return ValidationSplit(fit, relevant, blocked_items=blocked_items)


def lists_of(model: Recommender, split: ValidationSplit, k: int, diversity_lambda: float = 0.0) -> np.ndarray:
    users = split.users()
    exclude = (split.fit if split.exclude is None else split.exclude).tocsr()[users]
    return model.recommend(users, split.fit, k, exclude=exclude, blocked=split.blocked(),
                           diversity_lambda=diversity_lambda)


def validation_metrics(model: Recommender, split: ValidationSplit, k: int, diversity_lambda: float = 0.0) -> dict[str, float]:
    """METRICS of a model fitted on ``split.fit``, on ``split.relevant``."""
    users = split.users()
    n_catalog = split.fit.shape[1] - (0 if split.blocked() is None else int(split.blocked().sum()))
    metrics = ranking_metrics(lists_of(model, split, k, diversity_lambda), split.relevant.tocsr()[users], k,
                              n_catalog_items=max(n_catalog, 1))
    return {name: getattr(metrics, name) for name in METRICS}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {name: float(np.mean([row[name] for row in rows])) for name in METRICS}


def select(
    splits: list[ValidationSplit],
    families: tuple[str, ...] = ("als", "item_knn", "ease", "blend"),
    seed: int = 42,
    k: int = 10,
    objective: Objective = "ndcg",
    grids: dict[str, list[dict[str, Any]]] | None = None,
    diversity_lambda: float = 0.0,
) -> Selection:
    """The family and settings with the best mean ``objective``@k over ``splits``.

    A family that refuses the data (EASE or item-kNN above their catalogue limit) is skipped and
    says why in ``skipped``; "blend" blends the two best other families. Ties keep the earlier
    family of ``families``.
    """
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise InputError(f"unknown model families: {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    if not splits:
        raise InputError("model selection needs at least one validation split")
    grids = GRIDS if grids is None else grids
    tried: list[Candidate] = []
    best: dict[str, Candidate] = {}
    fitted: dict[str, list[Recommender]] = {}  # the best settings' models, one per split, for the blend
    skipped: dict[str, str] = {}
    for family in (f for f in families if f != "blend"):
        for params in grids[family]:
            began = time.perf_counter()
            try:
                models = [make(family, **params).fit(split.fit, seed) for split in splits]
            except InputError as refused:
                skipped[family] = str(refused)
                break
            scores = _mean([validation_metrics(model, split, k, diversity_lambda)
                            for model, split in zip(models, splits, strict=True)])
            candidate = Candidate(family, params, scores, time.perf_counter() - began)
            tried.append(candidate)
            log.info("%s %s: %s", family, params, {name: round(value, 4) for name, value in scores.items()})
            if family not in best or scores[objective] > best[family].validation[objective]:
                best[family], fitted[family] = candidate, models
    ranked = sorted(best, key=lambda name: -best[name].validation[objective])
    if "blend" in families and len(ranked) >= 2:
        first, second = ranked[:2]
        for weight in BLEND_WEIGHTS:
            began = time.perf_counter()
            blends = [Blend([a, b], weight) for a, b in zip(fitted[first], fitted[second], strict=True)]
            scores = _mean([validation_metrics(blend, split, k, diversity_lambda)
                            for blend, split in zip(blends, splits, strict=True)])
            params = {"weight": weight, "parts": [{"family": first, "params": best[first].params},
                                                  {"family": second, "params": best[second].params}]}
            candidate = Candidate("blend", params, scores, time.perf_counter() - began)
            tried.append(candidate)
            if "blend" not in best or scores[objective] > best["blend"].validation[objective]:
                best["blend"] = candidate
    if not best:
        raise InputError("no model family could be fitted: " + "; ".join(skipped.values()))
    order = [family for family in families if family in best]
    chosen = max(order, key=lambda name: (best[name].validation[objective], -order.index(name)))
    return Selection(best[chosen], best, tried, skipped, objective)


def build(family: str, params: dict[str, Any]) -> Recommender:
    """An unfitted model from a candidate's family and params."""
    if family == "blend":
        parts = [build(part["family"], part["params"]) for part in params["parts"]]
        return Blend(parts, params["weight"])
    return make(family, **params)
