"""MovieLens-100k quality protocol (Microsoft Recommenders' benchmark): load, split, evaluate, dump.

The split mirrors ``recommenders.datasets.python_stratified_split(data, ratio=0.75, seed=42)``:
``np.random.seed(seed)`` then one ``np.random.rand`` draw per row in file order; rows sorted by
(user, draw); per user ``rank = position / count`` (position 1-based); ``rank <= ratio`` is train,
the rest test. So a user with n ratings keeps exactly floor(ratio * n) in train (not round()).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recsys.ml.evaluation import Evaluation

COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
GENRE_COUNT = 19  # u.item's last 19 columns: one 0/1 flag per genre ("unknown" is one of them)


def load_ratings(data: Path) -> pd.DataFrame:
    """``u.data`` (tab separated user, item, rating, unix time); ``data`` is the file or its folder."""
    path = data / "u.data" if data.is_dir() else data
    return pd.read_csv(path, sep="\t", names=COLUMNS, dtype="int64")


def load_genres(data: Path, item_ids: np.ndarray) -> np.ndarray | None:
    """(items, 19) genre flags from ``u.item`` (pipe separated, Latin-1) in ``item_ids`` order, or
    None without a ``u.item`` beside ``u.data``. An item missing from it has no genre (zero row)."""
    path = (data if data.is_dir() else data.parent) / "u.item"
    if not path.exists():
        return None
    table = pd.read_csv(path, sep="|", header=None, encoding="latin-1")
    flags = table.iloc[:, -GENRE_COUNT:].to_numpy(dtype=np.float32)
    row = {int(item): position for position, item in enumerate(table.iloc[:, 0])}
    genres = np.zeros((len(item_ids), GENRE_COUNT), dtype=np.float32)
    for index, item in enumerate(item_ids):
        if int(item) in row:
            genres[index] = flags[row[int(item)]]
    return genres


def stratified_split(
    ratings: pd.DataFrame, ratio: float = 0.75, seed: int = 42, user_col: str = "user_id"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-user random split; same rows as Recommenders' ``python_stratified_split``.

    Both parts keep the input's row order. Every user keeps floor(ratio * n) >= 1 rows in train
    when n >= 1 / ratio, so no user with enough ratings is lost from train.
    """
    draws = np.random.RandomState(seed).rand(len(ratings))
    users = ratings[user_col].to_numpy()
    order = np.lexsort((draws, users))
    sorted_users = users[order]
    group_start = np.r_[0, np.flatnonzero(sorted_users[1:] != sorted_users[:-1]) + 1]
    group_size = np.diff(np.r_[group_start, len(users)])
    position = np.arange(len(users)) - np.repeat(group_start, group_size) + 1
    in_train = np.empty(len(users), dtype=bool)
    in_train[order] = position / np.repeat(group_size, group_size) <= ratio
    return ratings[in_train], ratings[~in_train]


@dataclass(frozen=True)
class Matrices:
    """Train ratings and test relevance on one shared user x item index."""

    user_ids: np.ndarray  # raw id of each row
    item_ids: np.ndarray  # raw id of each column
    train: sp.csr_matrix  # rating as value
    test: sp.csr_matrix  # 1 for every test rating: any rating is relevant
    unseen_items: np.ndarray  # columns with no train rating: a model trained on train can't know them


def interaction_matrix(
    part: pd.DataFrame, user_ids: np.ndarray, item_ids: np.ndarray, binary: bool = False
) -> sp.csr_matrix:
    """Users x items on a given (sorted) id index: summed ratings, or 1 per pair if ``binary``."""
    rows = np.searchsorted(user_ids, part["user_id"].to_numpy())
    cols = np.searchsorted(item_ids, part["item_id"].to_numpy())
    values = part["rating"].to_numpy(dtype=np.float32)
    matrix = sp.csr_matrix((values, (rows, cols)), shape=(len(user_ids), len(item_ids)), dtype=np.float32)
    if binary:
        matrix.data[:] = 1.0  # a duplicated pair is still one relevant item
    return matrix


def build_matrices(train: pd.DataFrame, test: pd.DataFrame) -> Matrices:
    user_ids = np.union1d(train["user_id"].unique(), test["user_id"].unique())
    item_ids = np.union1d(train["item_id"].unique(), test["item_id"].unique())
    train_matrix = interaction_matrix(train, user_ids, item_ids)
    test_matrix = interaction_matrix(test, user_ids, item_ids, binary=True)
    seen = np.diff(train_matrix.tocsc().indptr) > 0
    return Matrices(user_ids, item_ids, train_matrix, test_matrix, np.flatnonzero(~seen))


def dump(directory: Path, train: pd.DataFrame, test: pd.DataFrame, matrices: Matrices, evaluation: Evaluation) -> None:
    """train.csv, test.csv and recommendations.csv in raw ids, for an independent metric check."""
    directory.mkdir(parents=True, exist_ok=True)
    train[COLUMNS].to_csv(directory / "train.csv", index=False)
    test[COLUMNS].to_csv(directory / "test.csv", index=False)
    rows, ranks = np.nonzero(evaluation.items >= 0)
    recommendations = pd.DataFrame(
        {
            "user_id": matrices.user_ids[evaluation.users[rows]],
            "item_id": matrices.item_ids[evaluation.items[rows, ranks]],
            "rank": ranks + 1,
            "score": evaluation.scores[rows, ranks],
        }
    )
    recommendations.to_csv(directory / "recommendations.csv", index=False)
