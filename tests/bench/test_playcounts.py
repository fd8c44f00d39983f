"""``recsys bench playcounts``: the generated long-tail data set and the selection run on it."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from recsys.bench.playcounts import generate
from recsys.cli import app


def test_generated_play_counts_are_seeded_counts_with_a_long_tail():
    data = generate(users=400, items=600, seed=3)
    again = generate(users=400, items=600, seed=3)
    assert (data.matrix != again.matrix).nnz == 0 and (data.genre == again.genre).all()
    assert (data.matrix != generate(users=400, items=600, seed=4).matrix).nnz > 0

    plays = data.matrix.data
    assert (plays >= 1).all() and (plays == np.round(plays)).all() and plays.max() >= 5 * np.median(plays)
    assert (np.diff(data.matrix.indptr) > 0).all()  # every generated user listened to something
    described = data.describe()
    assert described["pairs"] == data.matrix.nnz and described["plays"] == int(plays.sum())
    # a long tail: the most listened fifth of the catalogue holds twice its share of pairs
    assert described["pairs_on_top_20pct_items"] > 0.4


def test_the_command_chooses_the_family_best_on_validation_and_scores_all_on_test():
    result = CliRunner().invoke(app, ["bench", "playcounts", "--users", "300", "--items", "400", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])

    families = report["families"]
    assert set(families) == {"als", "bpr", "item_knn", "ease", "mult_dae", "blend"}
    objective = report["selection_objective"]
    best = max(families, key=lambda name: families[name]["validation"][objective])
    assert report["chosen"] == best and report["params"] == families[best]["params"]
    for row in [*families.values(), report["popularity"]]:
        assert 0 < row["test"]["ndcg"] <= 1 and 0 <= row["test"]["map"] <= row["test"]["ndcg"]
    assert report["data"]["users"] == 300 and report["test_users"] > 250
