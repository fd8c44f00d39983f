"""Train stage: implicit ALS on the weighted CSR; factors saved as npz plus a JSON manifest."""

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
from recsys.ml.als import fit_als, library_versions, save_factors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    model_dir: Path
    full_model: Path  # trained on the whole window: what gets published
    holdout_model: Path  # trained before the holdout cutoff: what gets evaluated


def train(matrix_dir: Path, model_dir: Path, params: PipelineParams, progress: bool = False) -> TrainResult:
    """Fit the same ALS twice: on the pre-holdout part (for the evaluation) and on everything."""
    matrix_manifest = json.loads((matrix_dir / MANIFEST).read_text())
    model_dir.mkdir(parents=True, exist_ok=True)
    als_params = dict(
        factors=params.factors,
        regularization=params.regularization,
        alpha=params.alpha,
        iterations=params.iterations,
        seed=params.seed,
    )
    outputs = {}
    started = time.monotonic()
    for name, matrix_file, factors_file in (("holdout", TRAIN, FACTORS_HOLDOUT), ("full", FULL, FACTORS_FULL)):
        user_items = sp.load_npz(matrix_dir / matrix_file).tocsr()
        log.info("training %s model on %s users x %s items, %s nnz", name, *user_items.shape, user_items.nnz)
        user_factors, item_factors = fit_als(user_items, progress=progress, **als_params)
        outputs[name] = model_dir / factors_file
        save_factors(outputs[name], user_factors, item_factors)
        del user_items, user_factors, item_factors  # the next fit needs the memory

    manifest = {
        "build_id": uuid.uuid4().hex,
        "matrix_build_id": matrix_manifest.get("build_id"),
        "params": params.to_dict(),
        "als": als_params,
        "window": matrix_manifest["window"],
        "counts": matrix_manifest["counts"],
        "files": {name: path.name for name, path in outputs.items()},
        "seconds": round(time.monotonic() - started, 3),  # both fits with their loading and saving
        "library_versions": library_versions(),
    }
    (model_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return TrainResult(model_dir=model_dir, full_model=outputs["full"], holdout_model=outputs["holdout"])


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
