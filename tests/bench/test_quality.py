"""The MovieLens protocol pieces on synthetic u.data-format data (never the real MovieLens)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from independent_metrics import recompute
from typer.testing import CliRunner

from recsys.bench import movielens as quality
from recsys.bench.frequency_scaled import fit_frequency_scaled
from recsys.bench.quality import DIVERSITY_LAMBDAS
from recsys.cli import app
from recsys.ml import selection


def synthetic_ratings(seed: int = 0, n_users: int = 60, n_items: int = 90) -> pd.DataFrame:
    """Two taste clusters so a model has something to learn; 20-40 ratings per user."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, n_users + 1):
        liked = np.arange(1, n_items // 2 + 1) if user % 2 else np.arange(n_items // 2 + 1, n_items + 1)
        others = np.setdiff1d(np.arange(1, n_items + 1), liked)
        n = int(rng.integers(20, 41))
        n_liked = int(n * 0.8)
        items = np.r_[rng.choice(liked, n_liked, replace=False), rng.choice(others, n - n_liked, replace=False)]
        for item in rng.permutation(items):
            rows.append((user, int(item), int(rng.integers(1, 6)), int(880_000_000 + rng.integers(0, 10**7))))
    return pd.DataFrame(rows, columns=quality.COLUMNS)


def pairs(frame: pd.DataFrame) -> set[tuple[int, int]]:
    return set(zip(frame["user_id"], frame["item_id"], strict=True))


@pytest.fixture(scope="module")
def ratings() -> pd.DataFrame:
    return synthetic_ratings()


def test_split_keeps_floor_three_quarters_of_every_user(ratings):
    train, test = quality.stratified_split(ratings, ratio=0.75, seed=42)

    assert len(train) + len(test) == len(ratings)
    assert not pairs(train) & pairs(test)
    counts = ratings.groupby("user_id").size()
    train_counts = train.groupby("user_id").size().reindex(counts.index, fill_value=0)
    assert (train_counts == np.floor(0.75 * counts)).all()
    assert set(test["user_id"]) == set(ratings["user_id"])  # no user lost


def test_split_is_deterministic_per_seed(ratings):
    first, _ = quality.stratified_split(ratings, seed=42)
    again, _ = quality.stratified_split(ratings, seed=42)
    other, _ = quality.stratified_split(ratings, seed=7)

    assert pairs(first) == pairs(again)
    assert pairs(first) != pairs(other)


def recommenders_split(data: pd.DataFrame, ratio: float, seed: int) -> pd.DataFrame:
    """Recommenders' python_stratified_split, transcribed in its own pandas steps."""
    data = data.copy()
    np.random.seed(seed)
    data["random"] = np.random.rand(data.shape[0])
    data = data.sort_values(["user_id", "random"])
    groups = data.groupby("user_id")
    data["rank"] = (groups.cumcount() + 1) / groups["user_id"].transform("count")
    return data[data["rank"] <= ratio]


def test_split_matches_recommenders_rows(ratings):
    train, _ = quality.stratified_split(ratings, ratio=0.75, seed=42)

    assert pairs(train) == pairs(recommenders_split(ratings, 0.75, 42))


def test_frequency_scaled_fit_is_deterministic_and_learns_the_clusters(ratings):
    matrices = quality.build_matrices(*quality.stratified_split(ratings))
    kwargs = dict(factors=8, regularization=1.0, alpha=2.0, iterations=8, seed=1, exponent=1.0, cg_steps=3)

    users, items = fit_frequency_scaled(matrices.train, **kwargs)
    users_again, _ = fit_frequency_scaled(matrices.train, **kwargs)

    assert users.shape == (matrices.train.shape[0], 8) and items.shape == (matrices.train.shape[1], 8)
    np.testing.assert_array_equal(users, users_again)
    scores = users @ items.T
    test = matrices.test.toarray() > 0
    unrated = (matrices.train.toarray() == 0) & ~test
    assert scores[test].mean() > scores[unrated].mean()


def write_u_data(ratings: pd.DataFrame, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    ratings.to_csv(directory / "u.data", sep="\t", header=False, index=False)
    return directory


def test_selection_only_ever_sees_train(ratings, tmp_path, monkeypatch):
    data = write_u_data(ratings, tmp_path / "ml")
    train, test = quality.stratified_split(ratings, ratio=0.75, seed=42)
    seen: list[selection.ValidationSplit] = []
    real = selection.select

    def spy(splits, *args, **kwargs):
        seen.extend(splits)
        return real(splits, *args, **kwargs)

    monkeypatch.setattr(selection, "select", spy)
    from recsys.bench.quality import VALIDATION_SPLITS, run_quality

    result = run_quality(data, seed=42, dump=None, families=("als", "ease", "blend"))

    matrices = quality.build_matrices(train, test)

    def raw_pairs(matrix: sp.csr_matrix) -> set[tuple[int, int]]:
        coo = matrix.tocoo()
        return set(zip(matrices.user_ids[coo.row].tolist(), matrices.item_ids[coo.col].tolist(), strict=True))

    assert len(seen) == VALIDATION_SPLITS
    for split in seen:
        fit_pairs, validation_pairs = raw_pairs(split.fit), raw_pairs(split.relevant)
        assert fit_pairs | validation_pairs == pairs(train)
        assert not fit_pairs & validation_pairs
        assert not (fit_pairs | validation_pairs) & pairs(test)
    assert set(result["families"]) == {"als", "ease", "blend"}
    # the chosen family is the validation winner, and `model` is its test row
    best = max(result["families"], key=lambda name: result["families"][name]["validation"]["ndcg"])
    assert result["chosen"] == best
    assert result["model"]["ndcg_at_10"] == pytest.approx(result["families"][best]["test"]["ndcg"], abs=1e-12)


def write_u_item(n_items: int, directory: Path, seed: int = 0) -> None:
    """Synthetic u.item: id, title, dates, url, then 19 genre flags (at least one per item)."""
    rng = np.random.default_rng(seed)
    lines = []
    for item in range(1, n_items + 1):
        flags = rng.random(quality.GENRE_COUNT) < 0.15
        flags[rng.integers(quality.GENRE_COUNT)] = True
        lines.append("|".join([str(item), f"Item {item} (1995)", "01-Jan-1995", "", "http://x"] + [str(int(f)) for f in flags]))
    (directory / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")


def test_bench_quality_prints_json_last_and_dumps_checkable_files(ratings, tmp_path):
    data = write_u_data(ratings, tmp_path / "ml")
    write_u_item(int(ratings["item_id"].max()), data)
    dump = tmp_path / "dump"

    result = CliRunner().invoke(
        app, ["bench", "quality", "--data", str(data), "--json", "--dump", str(dump),
                    "--plot", str(tmp_path / "tradeoff.svg")]
    )

    assert result.exit_code == 0, result.output
    last = json.loads(result.stdout.strip().splitlines()[-1])
    metric_keys = {"map", "ndcg_at_10", "precision_at_10", "recall_at_10"}
    assert set(last["model"]) == metric_keys and set(last["popularity"]) == metric_keys
    assert last["chosen"] in last["families"] and last["params"] == last["families"][last["chosen"]]["params"]
    assert {"als", "bpr", "item_knn", "ease", "mult_dae", "blend"} == set(last["families"])
    assert "BiVAE" in result.stdout

    assert list(pd.read_csv(dump / "train.csv").columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert list(pd.read_csv(dump / "test.csv").columns) == ["user_id", "item_id", "rating", "timestamp"]
    recommendations = pd.read_csv(dump / "recommendations.csv")
    assert list(recommendations.columns) == ["user_id", "item_id", "rank", "score"]
    train = pd.read_csv(dump / "train.csv")
    assert not pairs(recommendations) & pairs(train)  # train items are excluded

    independent = recompute(dump, k=10)
    for name in metric_keys:
        assert independent[name] == pytest.approx(last["model"][name], abs=1e-12)

    assert set(last["diversity"]) == {"model", "popularity"}
    for rows in last["diversity"].values():
        assert [row["lambda"] for row in rows] == list(DIVERSITY_LAMBDAS)
        for row in rows:
            assert 0 < row["coverage"] <= 1 and 0 <= row["intra_list_diversity"] <= 1 and row["novelty"] > 0
    plain = last["diversity"]["model"][0]
    # lambda 0 is the benchmark's own top 10
    assert {name: plain[name] for name in metric_keys} == last["model"]
    assert plain["coverage"] == last["coverage"]
    assert "novelty" in result.stdout  # the trade-off table
    assert "<svg" in (tmp_path / "tradeoff.svg").read_text()


def test_genres_follow_the_item_index_and_missing_items_have_none(tmp_path):
    (tmp_path / "u.item").write_text(
        "1|A|||x|" + "|".join(["1"] + ["0"] * 18) + "\n" + "3|C|||x|" + "|".join(["0"] * 18 + ["1"]) + "\n",
        encoding="latin-1",
    )
    genres = quality.load_genres(tmp_path, np.array([3, 1, 2]))
    assert genres[0, 18] == 1 and genres[0].sum() == 1
    assert genres[1, 0] == 1 and genres[1].sum() == 1
    assert genres[2].sum() == 0
    (tmp_path / "no-item-file").mkdir()
    assert quality.load_genres(tmp_path / "no-item-file", np.array([1])) is None
