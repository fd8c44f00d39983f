"""The per-family search (recsys.ml.tuning) on a small generated matrix with two taste clusters."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from recsys.ml import selection, tuning


def clustered(seed: int = 0, users: int = 120, items: int = 80) -> tuning.TuningData:
    """Even users like the first half of the items, odd users the second; counts 1-9."""
    rng = np.random.default_rng(seed)
    rows, cols = [], []
    for user in range(users):
        liked = np.arange(items // 2) + (items // 2) * (user % 2)
        picks = rng.choice(liked, 12, replace=False)
        rows += [user] * len(picks)
        cols += list(picks)
    counts = sp.csr_matrix((rng.integers(1, 10, len(rows)).astype(np.float32), (rows, cols)), shape=(users, items))
    split = selection.carve_validation(counts, seed)
    return tuning.TuningData(split.fit, split.relevant)


def test_the_start_is_trial_0_as_given_and_the_best_trial_wins():
    data = clustered()
    start = {"factors": 16, "regularization": 5.0, "alpha": 2.0, "iterations": 6}

    result = tuning.tune("als", data, start, "log", n_trials=4, seed=3, repeats=2)

    assert result.start.number == 0 and result.start.params == start and result.start.confidence_scaling == "log"
    assert [t.number for t in result.trials] == [0, 1, 2, 3] and result.repeats == 2
    assert result.best.mean["map"] == max(t.mean["map"] for t in result.trials) > 0
    assert any(t.sd["map"] > 0 for t in result.trials)  # ALS's seeds differ; the spread is measured


def test_a_start_outside_the_space_is_measured_as_it_is_and_deterministic_families_fit_once():
    data = clustered()
    result = tuning.tune("ease", data, {"regularization": 1.0}, "log", n_trials=3, seed=3, repeats=3)

    assert result.start.params == {"regularization": 1.0, "binary": True}  # under the space's 10: kept
    assert result.repeats == 1 and all(t.sd["map"] == 0.0 for t in result.trials)
    again = tuning.tune("ease", data, {"regularization": 1.0}, "log", n_trials=3, seed=3, repeats=3)
    assert [(t.params, t.mean) for t in again.trials] == [(t.params, t.mean) for t in result.trials]
