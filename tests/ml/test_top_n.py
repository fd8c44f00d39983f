"""rank_lists, the one ranking behind publish, evaluate and the API, against a plain reference:
dense float64 scores, a full sort, and MMR written out in Python."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from recsys.core.params import PipelineParams
from recsys.core.rules import Rule, RuleSnapshot
from recsys.ml import top_n
from recsys.ml.families import Als
from recsys.ml.merchandising import Merchandising, place_pins_in_list
from recsys.ml.top_n import USER_BLOCK, ItemVectors, rank_lists, similar_items
from recsys.pipeline.publish.stage import _ruled_top_n
from recsys.serving.fold_in import rank_items
from recsys.serving.live_model import LiveModel


def shop(users: int = 300, items: int = 500, dims: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    user_factors = rng.normal(size=(users, dims)).astype(np.float32)
    # norms that vary as ALS's do, so the catalogue order by norm is not the index order
    item_factors = (rng.normal(size=(items, dims)) * rng.gamma(2.0, 0.5, size=(items, 1))).astype(np.float32)
    exclude = sp.random(users, items, density=0.05, format="csr", random_state=seed, dtype=np.float32)
    exclude.data[:] = 1
    blocked = np.zeros(items, dtype=bool)
    blocked[rng.choice(items, items // 20, replace=False)] = True
    factors = np.exp(rng.normal(0, 0.4, size=items)).astype(np.float32)
    return user_factors, item_factors, exclude, blocked, factors


def reference_mmr(candidates, scores, picks, diversity_lambda, unit, chosen, top):
    """MMR as the module docstring of recsys.ml.diversity writes it, one candidate at a time."""
    relevance = [s / top if top > 0 else s for s in scores]
    chosen = list(chosen)
    result, open_ = [], list(range(len(candidates)))
    while len(result) < picks and open_:
        def value(i):
            penalty = max((float(unit[candidates[i]].astype(np.float64) @ unit[c].astype(np.float64)) for c in chosen),
                          default=0.0)
            return (1 - diversity_lambda) * relevance[i] - diversity_lambda * penalty
        best = max(open_, key=lambda i: (value(i), -i))
        result.append(candidates[best])
        chosen.append(candidates[best])
        open_.remove(best)
    return result


def reference_lists(user_factors, item_factors, n, exclude=None, blocked=None, factors=None, diversity_lambda=0.0,
                    first=None, head=None):
    scores = user_factors.astype(np.float64) @ item_factors.T.astype(np.float64)
    if factors is not None:
        scores *= factors.astype(np.float64)
    if blocked is not None:
        scores[:, blocked] = -np.inf
    if exclude is not None:
        scores[exclude.nonzero()] = -np.inf
    unit = ItemVectors.of(item_factors).unit
    first = n if first is None else first
    out = np.full((len(user_factors), n), -1, dtype=np.int32)
    for row, row_scores in enumerate(scores):
        row_head = [] if head is None or diversity_lambda == 0 else [i for i in head[row] if i >= 0]
        row_scores = row_scores.copy()
        row_scores[row_head] = -np.inf
        order = [int(i) for i in np.lexsort((np.arange(len(row_scores)), -row_scores)) if np.isfinite(row_scores[i])]
        pool = order[: n * (4 if diversity_lambda > 0 else 1)]
        pool_scores = [row_scores[i] for i in pool]
        if diversity_lambda == 0:
            listed = pool[:n]
        elif row_head:
            top = max(pool_scores[:1] + [row_scores_of(user_factors[row], item_factors, factors, i) for i in row_head])
            listed = row_head + reference_mmr(pool, pool_scores, n - len(row_head), diversity_lambda, unit, row_head, top)
        elif pool:
            opening = pool[: 4 * first]
            listed = reference_mmr(opening, pool_scores[: len(opening)], first, diversity_lambda, unit, [], pool_scores[0])
            rest = [i for i in pool if i not in listed]
            listed += reference_mmr(rest, [row_scores[i] for i in rest], n - first, diversity_lambda, unit, listed,
                                    pool_scores[0])
        else:
            listed = []
        out[row, : len(listed[:n])] = listed[:n]
    return out


def row_scores_of(user, item_factors, factors, item):
    score = float(user.astype(np.float64) @ item_factors[item].astype(np.float64))
    return score * (1.0 if factors is None else float(factors[item]))


@pytest.mark.parametrize("diversity_lambda", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("scaled", [False, True])
def test_a_batch_is_the_reference_ranking(diversity_lambda: float, scaled: bool):
    user_factors, item_factors, exclude, blocked, factors = shop(users=2 * USER_BLOCK + 44)  # three blocks, threads
    kwargs = {"exclude": exclude, "blocked": blocked, "factors": factors if scaled else None,
              "diversity_lambda": diversity_lambda, "first": 10}

    lists = rank_lists(user_factors, ItemVectors.of(item_factors), 13, **kwargs)

    np.testing.assert_array_equal(lists, reference_lists(user_factors, item_factors, 13, **kwargs))
    for row, listed in enumerate(lists):
        assert not set(listed) & (set(exclude[row].indices) | set(np.flatnonzero(blocked)))
        assert len(set(listed)) == 13


@pytest.mark.parametrize("scaled", [False, True])
def test_a_scan_stopped_early_lists_what_a_scan_of_every_item_lists(monkeypatch, scaled: bool):
    """Items' vectors as long-tailed as ALS's (popular items long): most users' scans stop after
    the first tiles, and every list is the one a scan of the whole catalogue gives (the same
    function with the stop disabled) and the float64 reference's."""
    rng = np.random.default_rng(5)
    users, items, dims = USER_BLOCK + 60, 3 * top_n._MIN_TILE_ITEMS + 500, 16
    user_factors = rng.normal(size=(users, dims)).astype(np.float32)
    item_factors = (rng.normal(size=(items, dims)) * rng.lognormal(0, 1.2, size=(items, 1))).astype(np.float32)
    _, _, exclude, blocked, factors = shop(users, items, dims, seed=5)
    for row in range(0, users, 7):  # some users own (and so never get) the longest vectors
        exclude[row, np.argsort(-np.linalg.norm(item_factors, axis=1))[:30]] = 1
    head = np.full((users, 3), -1, np.int32)
    head[::3, :2] = rng.choice(items, size=(len(head[::3]), 2), replace=False)
    kwargs = {"exclude": exclude.tocsr(), "blocked": blocked, "factors": factors if scaled else None,
              "diversity_lambda": 0.3, "first": 10}
    scanned = []
    scan_tile = top_n._scan_tile

    def counting(scores, *args):
        scanned.append(scores.shape[0] * scores.shape[1])
        return scan_tile(scores, *args)

    monkeypatch.setattr(top_n, "_scan_tile", counting)
    vectors = ItemVectors.of(item_factors)
    stopped = rank_lists(user_factors, vectors, 12, **kwargs)
    stopped_head = rank_lists(user_factors, vectors, 12, head=head, **kwargs)
    scored = sum(scanned)
    of_scoring = top_n._Scoring.of
    monkeypatch.setattr(top_n._Scoring, "of", lambda *a, **k: replace(of_scoring(*a, **k), reach=None))
    scanned.clear()
    every = rank_lists(user_factors, vectors, 12, **kwargs)
    every_head = rank_lists(user_factors, vectors, 12, head=head, **kwargs)

    assert scored < 0.5 * sum(scanned)  # the stop did stop scans
    np.testing.assert_array_equal(stopped, every)
    np.testing.assert_array_equal(stopped_head, every_head)
    np.testing.assert_array_equal(stopped, reference_lists(user_factors, item_factors, 12, **kwargs))


def test_a_scan_never_stops_before_an_item_that_can_still_enter_the_list():
    """Nearly equal vector lengths: the first tile's best scores stay below what a later item
    can reach, and users pointing at a later item (a cosine of 1) get it first."""
    rng = np.random.default_rng(6)
    items, dims = 2 * top_n._MIN_TILE_ITEMS + 300, 16
    directions = rng.normal(size=(items, dims))
    item_factors = (directions / np.linalg.norm(directions, axis=1, keepdims=True)
                    * rng.uniform(1.0, 1.2, size=(items, 1))).astype(np.float32)
    later = np.argsort(-np.linalg.norm(item_factors, axis=1))[top_n._MIN_TILE_ITEMS : top_n._MIN_TILE_ITEMS + 100]
    user_factors = np.vstack([item_factors[later] * 3, rng.normal(size=(50, dims))]).astype(np.float32)

    lists = rank_lists(user_factors, ItemVectors.of(item_factors), 10, diversity_lambda=0.3)

    np.testing.assert_array_equal(lists[: len(later), 0], later)
    np.testing.assert_array_equal(lists, reference_lists(user_factors, item_factors, 10, diversity_lambda=0.3))


@pytest.mark.parametrize("diversity_lambda", [0.0, 0.5])
def test_one_user_on_request_gets_the_list_of_the_batch(diversity_lambda: float):
    user_factors, item_factors, exclude, blocked, factors = shop()
    items = ItemVectors.of(item_factors)
    kwargs = {"blocked": blocked, "factors": factors, "diversity_lambda": diversity_lambda, "first": 10}
    batch = rank_lists(user_factors, items, 12, exclude=exclude, **kwargs)

    # one user: a different sgemm shape, the blocked items masked instead of dropped
    alone = np.vstack([rank_lists(user_factors[row], items, 12, exclude=exclude[row], **kwargs) for row in range(40)])

    np.testing.assert_array_equal(alone, batch[:40])


def test_ties_go_to_the_lower_item_index_however_many():
    rng = np.random.default_rng(3)
    item_factors = rng.normal(size=(400, 8)).astype(np.float32)
    item_factors[100:300] = item_factors[7]  # 201 copies of one item: far more ties than the heap holds
    user_factors = np.tile(item_factors[7], (5, 1)) + rng.normal(0, 1e-3, size=(5, 8)).astype(np.float32)

    lists = rank_lists(user_factors, ItemVectors.of(item_factors), 10)

    np.testing.assert_array_equal(lists, reference_lists(user_factors, item_factors, 10))
    assert lists[:, 0].tolist() == [7] * 5 and lists[0, 1:].tolist() == list(range(100, 109))


def test_a_head_is_continued_and_never_repeated():
    user_factors, item_factors, exclude, blocked, _ = shop(users=20)
    head = np.full((20, 5), -1, dtype=np.int32)
    plain = rank_lists(user_factors, ItemVectors.of(item_factors), 3, exclude=exclude, blocked=blocked)
    head[:, :3] = plain  # a published list, as the API continues it

    lists = rank_lists(user_factors, ItemVectors.of(item_factors), 12, exclude=exclude, blocked=blocked,
                       diversity_lambda=0.4, head=head)

    np.testing.assert_array_equal(lists[:, :3], plain)
    np.testing.assert_array_equal(lists, reference_lists(user_factors, item_factors, 12, exclude=exclude,
                                                         blocked=blocked, diversity_lambda=0.4, head=head))
    assert all(len(set(row)) == 12 for row in lists)


def test_fewer_allowed_items_than_the_list_pad_it():
    user_factors, item_factors, *_ = shop(users=3, items=30)
    blocked = np.ones(30, dtype=bool)
    blocked[[4, 9, 17]] = False

    for diversity_lambda in (0.0, 0.3):
        lists = rank_lists(user_factors, ItemVectors.of(item_factors), 5, blocked=blocked,
                           diversity_lambda=diversity_lambda)
        assert (lists[:, 3:] == -1).all() and all(set(row[:3]) == {4, 9, 17} for row in lists)
    nothing = rank_lists(user_factors, ItemVectors.of(item_factors), 5, blocked=np.ones(30, dtype=bool))
    assert (nothing == -1).all()


def test_bad_lambda_is_refused():
    user_factors, item_factors, *_ = shop(users=2, items=20)
    with pytest.raises(ValueError, match="diversity_lambda"):
        rank_lists(user_factors, ItemVectors.of(item_factors), 5, diversity_lambda=1.5)


def test_publish_and_the_api_rank_the_same_lists_with_rules():
    """publish's per-segment lists and the API's ranking on request (rank_items, then the pins
    placed as the service places them) on one model and one set of rules."""
    user_factors, item_factors, exclude, _, _ = shop(users=60, items=300)
    n_items = len(item_factors)
    item_ids = [str(i) for i in range(n_items)]
    categories = np.array(["shoes" if i % 3 else "hats" for i in range(n_items)], dtype=object)
    active = np.ones(n_items, dtype=bool)
    active[[5, 50, 150]] = False
    snapshot = RuleSnapshot(
        taken_at=datetime.now(UTC),
        rules=(
            Rule(rule_id=1, kind="boost", category="hats", factor=2.5),
            Rule(rule_id=2, kind="bury", product_id="42", factor=0.2),
            Rule(rule_id=3, kind="exclude", product_id="77"),
            Rule(rule_id=4, kind="pin", product_id="120", rank=2),
        ),
    )
    merchandising = Merchandising(snapshot, item_ids, categories)
    params = PipelineParams()
    users = np.arange(60, dtype=np.int32)
    published = _ruled_top_n(merchandising, Als(user_factors=user_factors, item_factors=item_factors), None,
                             pa.array([str(u) for u in users]), users, exclude, np.flatnonzero(~active), params, progress=None)
    live = LiveModel(
        version="v", build="b", buckets=1, params=params, data_start=None, model=None, user_index={}, item_ids=item_ids,
        item_index={}, id_types=None, active=active, category=categories, categories=frozenset(), popular=np.array([]),
        exclude=exclude, document_frequency=None, confidence=None, items=ItemVectors.of(item_factors),
        rules_fingerprint="", published_rules=None,
    )
    rules = merchandising.for_segments(frozenset())

    for user in users:
        owned = exclude[user].indices.tolist()
        ranked = rank_items(live, user_factors[user], [*rules.blocked_items.tolist(), *owned], None,
                            params.top_n + len(rules.pins), params.diversity_lambda, None, rules.factors)
        on_request = place_pins_in_list(ranked, rules.pins, params.top_n, unavailable=owned)
        assert on_request == [int(i) for i in published[user] if i >= 0]
    assert (published[:, 1] == 120).sum() > 0 and not np.isin(published, [5, 50, 77, 150]).any()


def test_similar_items_are_the_cosine_ranking_without_the_item_or_blocked_ones():
    _, item_factors, _, blocked, _ = shop(items=700)
    item_factors[5] = 0  # an item with no factors (never interacted): similar to nothing more than to anything
    queries = np.arange(0, 700, 3)
    blocked_items = np.flatnonzero(blocked)

    lists = similar_items(ItemVectors.of(item_factors), queries, 10, blocked)

    unit = item_factors.astype(np.float64)
    norms = np.linalg.norm(unit, axis=1, keepdims=True)
    unit = np.divide(unit, norms, out=np.zeros_like(unit), where=norms > 0)
    cosine = unit[queries] @ unit.T
    cosine[:, blocked_items] = -np.inf
    cosine[np.arange(len(queries)), queries] = -np.inf
    expected = [np.lexsort((np.arange(700), -row))[:10] for row in cosine]
    np.testing.assert_array_equal(lists, expected)


def test_similar_items_of_one_product_on_request_are_those_of_the_batch():
    _, item_factors, _, blocked, _ = shop(items=3000)
    items = ItemVectors.of(item_factors)
    batch = similar_items(items, np.arange(3000), 10, blocked)

    alone = np.vstack([similar_items(items, [item], 10, blocked) for item in range(0, 3000, 97)])

    np.testing.assert_array_equal(alone, batch[::97])


def test_similar_items_agree_with_implicit():
    from recsys.ml.ranking import als_model

    user_factors, item_factors, _, blocked, _ = shop(items=2000)
    blocked_items = np.flatnonzero(blocked)
    queries = np.arange(2000, dtype=np.int32)
    ids, _ = als_model(user_factors, item_factors).similar_items(queries, N=11, filter_items=blocked_items)
    theirs = [[i for i in row if i != query][:10] for row, query in zip(np.asarray(ids), queries, strict=True)]

    ours = similar_items(ItemVectors.of(item_factors), queries, 10, blocked)

    # implicit ranks by float32 scores: only near-ties may come out in another order
    assert (ours == np.asarray(theirs)).all(axis=1).mean() > 0.99
