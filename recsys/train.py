"""Train stage: implicit ALS on the weighted CSR; factors saved as npz plus a JSON manifest."""

from __future__ import annotations

import json
import logging
import platform
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from recsys.errors import RunChangedError
from recsys.params import PipelineParams

log = logging.getLogger(__name__)


def fit_als(
    user_items: sp.csr_matrix,
    factors: int,
    regularization: float,
    alpha: float,
    iterations: int,
    seed: int,
    progress: bool = False,
    regularization_exponent: float = 0.0,
    cg_steps: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit implicit's CPU ALS; returns (user_factors, item_factors) as float32 arrays.

    implicit runs its own thread pool; a multi-threaded BLAS underneath it oversubscribes the
    cores, so BLAS is held to one thread while fitting (what implicit's own warning asks for).

    ``regularization_exponent`` > 0 switches to frequency-scaled regularization (Rendle et al.
    2022, "Revisiting the performance of iALS on item recommendation benchmarks"), which implicit
    cannot express: see ``_fit_frequency_scaled``. At 0 (the default) implicit is used unchanged.
    ``cg_steps`` only applies to that solver (implicit's own default is also 3).
    """
    if regularization_exponent > 0:
        return _fit_frequency_scaled(
            user_items, factors, regularization, alpha, iterations, seed, regularization_exponent, cg_steps
        )
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        model = AlternatingLeastSquares(
            factors=factors,
            regularization=regularization,
            alpha=alpha,
            iterations=iterations,
            random_state=seed,
        )
        model.fit(user_items.tocsr().astype(np.float32, copy=False), show_progress=progress)
    return np.asarray(model.user_factors), np.asarray(model.item_factors)


def _fit_frequency_scaled(
    user_items: sp.csr_matrix,
    factors: int,
    regularization: float,
    alpha: float,
    iterations: int,
    seed: int,
    exponent: float,
    cg_steps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """iALS with implicit's loss but a per-row penalty: sum_ui c_ui (p_ui - x_u.y_i)^2 + sum_u l_u|x_u|^2 + ...

    c_ui = 1 + alpha * r_ui, p_ui = [r_ui > 0], as in implicit. l_u = regularization *
    (w_u / mean w)^exponent where w_u = n_items + alpha * sum_i r_ui is the row's total confidence
    weight: heavy rows get proportionally more penalty, so one ``regularization`` fits light and
    heavy users (and niche and hit items) alike. Normalising by the mean keeps ``regularization`` on
    the same scale as the unscaled penalty. Each half-step runs ``cg_steps`` of conjugate gradient
    warm-started from the previous factors, like implicit's default solver, vectorised over rows.
    Memory is O(nnz * factors) per half-step: sized for benchmark data (ML-100k), not for
    production windows, where implicit (exponent 0) is the solver.
    """
    user_items = user_items.tocsr().astype(np.float32)
    item_users = user_items.T.tocsr()
    rng = np.random.default_rng(seed)
    # implicit's initialisation scale: small uniform factors
    user_factors = (rng.random((user_items.shape[0], factors), dtype=np.float32) * 0.01).astype(np.float32)
    item_factors = (rng.random((user_items.shape[1], factors), dtype=np.float32) * 0.01).astype(np.float32)
    user_penalty = _row_penalty(user_items, alpha, regularization, exponent)
    item_penalty = _row_penalty(item_users, alpha, regularization, exponent)
    for _ in range(iterations):
        user_factors = _conjugate_gradient(user_items, item_factors, user_factors, user_penalty, alpha, cg_steps)
        item_factors = _conjugate_gradient(item_users, user_factors, item_factors, item_penalty, alpha, cg_steps)
    return user_factors, item_factors


def _row_penalty(rows: sp.csr_matrix, alpha: float, regularization: float, exponent: float) -> np.ndarray:
    weight = rows.shape[1] + alpha * np.asarray(rows.sum(axis=1), dtype=np.float64).ravel()
    return (regularization * (weight / weight.mean()) ** exponent).astype(np.float32)


def _conjugate_gradient(
    rows: sp.csr_matrix,
    fixed: np.ndarray,
    start: np.ndarray,
    penalty: np.ndarray,
    alpha: float,
    steps: int,
) -> np.ndarray:
    """A few CG steps on every row's normal equations at once.

    Row u solves (Y'Y + Y_u' diag(alpha r_u) Y_u + l_u I) x = Y_u' (1 + alpha r_u); the sparse
    term is applied as per-nonzero dot products, so no per-row Gram matrix is ever formed.
    """
    gram = fixed.T @ fixed
    extra = rows.copy()
    extra.data = alpha * extra.data
    row_sizes = np.diff(rows.indptr)
    observed_fixed = fixed[rows.indices]  # gathered once: the same for every CG step

    def apply(vectors: np.ndarray) -> np.ndarray:
        dots = np.einsum("ij,ij->i", np.repeat(vectors, row_sizes, axis=0), observed_fixed)
        weighted = sp.csr_matrix((extra.data * dots, rows.indices, rows.indptr), shape=rows.shape)
        return vectors @ gram + penalty[:, None] * vectors + weighted @ fixed

    target = sp.csr_matrix((1.0 + extra.data, rows.indices, rows.indptr), shape=rows.shape) @ fixed
    solution = start.copy()
    residual = target - apply(solution)
    direction = residual.copy()
    residual_norm = np.einsum("ij,ij->i", residual, residual)
    tiny = np.float32(1e-20)
    for _ in range(steps):
        applied = apply(direction)
        curvature = np.einsum("ij,ij->i", direction, applied)
        step = np.where(curvature > tiny, residual_norm / np.maximum(curvature, tiny), 0.0)[:, None]
        solution += step * direction
        residual -= step * applied
        new_norm = np.einsum("ij,ij->i", residual, residual)
        ratio = np.where(residual_norm > tiny, new_norm / np.maximum(residual_norm, tiny), 0.0)[:, None]
        direction = residual + ratio * direction
        residual_norm = new_norm
    return solution.astype(np.float32)


def save_factors(path: Path, user_factors: np.ndarray, item_factors: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, user_factors=user_factors, item_factors=item_factors)
    tmp.replace(path)


def load_factors(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as saved:
        return saved["user_factors"], saved["item_factors"]


def library_versions() -> dict[str, str]:
    import implicit
    import scipy

    return {
        "python": platform.python_version(),
        "implicit": implicit.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


@dataclass(frozen=True)
class TrainResult:
    model_dir: Path
    full_model: Path  # trained on the whole window: what gets published
    holdout_model: Path  # trained before the holdout cutoff: what gets evaluated


def train(matrix_dir: Path, model_dir: Path, params: PipelineParams, progress: bool = False) -> TrainResult:
    """Fit the same ALS twice: on the pre-holdout part (for the evaluation) and on everything."""
    matrix_manifest = json.loads((matrix_dir / "manifest.json").read_text())
    model_dir.mkdir(parents=True, exist_ok=True)
    als_params = dict(
        factors=params.factors,
        regularization=params.regularization,
        alpha=params.alpha,
        iterations=params.iterations,
        seed=params.seed,
    )
    outputs = {}
    for name, matrix_file in (("holdout", "train.npz"), ("full", "full.npz")):
        user_items = sp.load_npz(matrix_dir / matrix_file).tocsr()
        log.info("training %s model on %s users x %s items, %s nnz", name, *user_items.shape, user_items.nnz)
        user_factors, item_factors = fit_als(user_items, progress=progress, **als_params)
        outputs[name] = model_dir / f"{name}.npz"
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
        "library_versions": library_versions(),
    }
    (model_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return TrainResult(model_dir=model_dir, full_model=outputs["full"], holdout_model=outputs["holdout"])


def checked_model_build(matrix_dir: Path, model_dir: Path) -> str | None:
    """The model's build id, once it is known to be trained on this matrix build: another run of
    the same window may have rebuilt one of the two in between."""
    model = json.loads((model_dir / "manifest.json").read_text())
    matrix_build = json.loads((matrix_dir / "manifest.json").read_text()).get("build_id")
    if model.get("matrix_build_id") != matrix_build:
        raise RunChangedError(
            f"the model in {model_dir} was trained on another build of {matrix_dir} (another run of the same "
            "window rebuilt it?); run train again"
        )
    return model.get("build_id")
