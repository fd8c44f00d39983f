"""Train stage: the model family chosen on a validation split of the pre-holdout data
(``params.models``), fitted on the weighted CSR; saved as npz (arrays and a JSON description) plus a JSON manifest."""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import scipy.sparse as sp

from recsys.core.errors import RunChangedError
from recsys.core.layout import FACTORS_FULL, FACTORS_HOLDOUT, FULL, MANIFEST, TRAIN
from recsys.core.params import PipelineParams
from recsys.ml import selection
from recsys.ml.als import library_versions
from recsys.pipeline.matrix import holdout_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    model_dir: Path
    full_model: Path  # trained on the whole window: what gets published
    holdout_model: Path  # trained before the holdout cutoff: what gets evaluated
    family: str = "als"  # the chosen model family


def candidate_grids(params: PipelineParams) -> dict[str, list[dict]]:
    """One setting per family in a daily run: ALS the run's (tuned) params, the others their
    defaults (the benchmark's grids choose among several: ``recsys.ml.selection.GRIDS``)."""
    return {
        "als": [{"factors": params.factors, "regularization": params.regularization, "alpha": params.alpha,
                 "iterations": params.iterations}],
        "bpr": [{}],
        "item_knn": [{}],
        "ease": [{}],
    }


def choose_family(matrix_dir: Path, params: PipelineParams) -> selection.Selection | None:
    """Every family of ``params.models`` fitted on a per-user random 75 % of the pre-holdout
    matrix and scored (MAP@K of the lists publish makes) on the other 25 %: the holdout itself
    stays the gate's. None with ALS alone (nothing to choose)."""
    if params.models == ("als",):
        return None
    split = holdout_split(matrix_dir)
    validation = selection.carve_validation(split.fit, params.seed, blocked_items=split.blocked_items)
    return selection.select(
        [validation], params.models, seed=params.seed, k=params.k, objective="map", grids=candidate_grids(params),
        diversity_lambda=params.diversity_lambda,
    )


def train(matrix_dir: Path, model_dir: Path, params: PipelineParams, progress: bool = False) -> TrainResult:
    """Choose the model family (``choose_family``), then fit it twice: on the pre-holdout part
    (for the evaluation) and on everything."""
    matrix_manifest = json.loads((matrix_dir / MANIFEST).read_text())
    model_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    chosen = choose_family(matrix_dir, params)
    family, family_params = ("als", candidate_grids(params)["als"][0]) if chosen is None else (
        chosen.chosen.family, chosen.chosen.params)
    outputs = {}
    for name, matrix_file, factors_file in (("holdout", TRAIN, FACTORS_HOLDOUT), ("full", FULL, FACTORS_FULL)):
        user_items = sp.load_npz(matrix_dir / matrix_file).tocsr()
        log.info("training %s %s model on %s users x %s items, %s nnz", family, name, *user_items.shape, user_items.nnz)
        model = selection.build(family, family_params).fit(user_items, params.seed)
        outputs[name] = model_dir / factors_file
        model.save(outputs[name])
        del user_items, model  # the next fit needs the memory

    manifest = {
        "build_id": uuid.uuid4().hex,
        "matrix_build_id": matrix_manifest.get("build_id"),
        "params": params.to_dict(),
        "model": {"family": family, "params": family_params},
        "als": {**candidate_grids(params)["als"][0], "seed": params.seed},  # ALS's settings, chosen or not
        "selection": None if chosen is None else chosen.to_dict(),
        "window": matrix_manifest["window"],
        "counts": matrix_manifest["counts"],
        "files": {name: path.name for name, path in outputs.items()},
        "seconds": round(time.monotonic() - started, 3),  # selection and both fits with their loading and saving
        "library_versions": library_versions(),
    }
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return TrainResult(model_dir=model_dir, full_model=outputs["full"], holdout_model=outputs["holdout"], family=family)


def checked_model_build(matrix_dir: Path, model_dir: Path) -> str | None:
    """The model's build id, once it is known to be trained on this matrix build: another run of
    the same window may have rebuilt one of the two in between."""
    model = json.loads((model_dir / MANIFEST).read_text())
    matrix_build = json.loads((matrix_dir / MANIFEST).read_text()).get("build_id")
    if model.get("matrix_build_id") != matrix_build:
        raise RunChangedError(
            f"the model in {model_dir} was trained on another build of {matrix_dir} (another run of the same "
            "window rebuilt it?); run train again"
        )
    return model.get("build_id")
