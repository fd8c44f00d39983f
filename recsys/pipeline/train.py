"""Train stage: the model family chosen on a validation split of the pre-holdout data
(``params.models``), fitted on the weighted CSR; saved as npz (arrays and a JSON description) plus a JSON manifest."""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import scipy.sparse as sp

from recsys.core.errors import RunChangedError
from recsys.core.experiments import Experiment
from recsys.core.layout import EXPERIMENT, FACTORS_FULL, FACTORS_HOLDOUT, FULL, MANIFEST, TRAIN, VARIANTS
from recsys.core.params import TUNABLE_FAMILY_PARAMS, PipelineParams
from recsys.ml import families, selection
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
    ``family_params`` (tuned, or the family's defaults); the benchmark's grids choose among
    several: ``recsys.ml.selection.GRIDS``."""
    given = {
        "als": {"factors": params.factors, "regularization": params.regularization, "alpha": params.alpha,
                "iterations": params.iterations},
        **{family: params.family_params.get(family, {}) for family in TUNABLE_FAMILY_PARAMS},
        "mult_dae": {},
    }
    # spelled out with the family's defaults for the rest: the report and the published meta name
    # every setting a model was fitted with, not just those a shop changed
    return {family: [families.make(family, **settings).params()] for family, settings in given.items()}


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


def _family(matrix_dir: Path, params: PipelineParams) -> tuple[str, dict, selection.Selection | None]:
    """The family to fit and its settings (``choose_family``'s choice, else ALS with the run's)."""
    chosen = choose_family(matrix_dir, params)
    if chosen is None:
        return "als", candidate_grids(params)["als"][0], None
    return chosen.chosen.family, chosen.chosen.params, chosen


def train_variants(matrix_dir: Path, model_dir: Path, params: PipelineParams, experiment: Experiment) -> dict:
    """A model on the whole matrix for each variant of ``experiment`` whose training params
    differ from ``params`` (and that no guardrail had stopped), in ``variants/<name>/``; what
    each is, by variant name. The variants' models are not evaluated: the experiment measures them."""
    fitted = {}
    for variant in experiment.variants:
        if variant.stopped_at is not None or not variant.trains_own_model(params):
            continue
        variant_params = variant.pipeline_params(params)
        family, family_params, _ = _family(matrix_dir, variant_params)
        user_items = sp.load_npz(matrix_dir / FULL).tocsr()
        log.info("training %s model of variant %s of experiment %s", family, variant.name, experiment.name)
        path = model_dir / VARIANTS / variant.name / FACTORS_FULL
        path.parent.mkdir(parents=True)
        selection.build(family, family_params).fit(user_items, variant_params.seed).save(path)
        del user_items
        fitted[variant.name] = {"model": {"family": family, "params": family_params},
                                "file": path.relative_to(model_dir).as_posix()}
    return fitted


def train(
    matrix_dir: Path, model_dir: Path, params: PipelineParams, progress: bool = False,
    experiment: Experiment | None = None,
) -> TrainResult:
    """Choose the model family (``choose_family``), then fit it twice: on the pre-holdout part
    (for the evaluation) and on everything. With ``experiment`` (the one running now), also a
    model for each variant that trains its own (``train_variants``), and its snapshot in
    ``experiment.json``, which publish serves."""
    matrix_manifest = json.loads((matrix_dir / MANIFEST).read_text())
    model_dir.mkdir(parents=True, exist_ok=True)
    # a rerun of the run replaces the experiment it served, or leaves none
    (model_dir / EXPERIMENT).unlink(missing_ok=True)
    shutil.rmtree(model_dir / VARIANTS, ignore_errors=True)
    started = time.monotonic()
    family, family_params, chosen = _family(matrix_dir, params)
    outputs = {}
    for name, matrix_file, factors_file in (("holdout", TRAIN, FACTORS_HOLDOUT), ("full", FULL, FACTORS_FULL)):
        user_items = sp.load_npz(matrix_dir / matrix_file).tocsr()
        log.info("training %s %s model on %s users x %s items, %s nnz", family, name, *user_items.shape, user_items.nnz)
        model = selection.build(family, family_params).fit(user_items, params.seed)
        outputs[name] = model_dir / factors_file
        model.save(outputs[name])
        del user_items, model  # the next fit needs the memory
    variants = {} if experiment is None else train_variants(matrix_dir, model_dir, params, experiment)

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
        "experiment": None if experiment is None else experiment.name,
        "variants": variants,
        "seconds": round(time.monotonic() - started, 3),  # selection and all fits with their loading and saving
        "library_versions": library_versions(),
    }
    if experiment is not None:
        (model_dir / EXPERIMENT).write_text(json.dumps(experiment.snapshot(), indent=2))
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
