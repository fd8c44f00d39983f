"""The run-folder contract: every folder and file a run's stages write and read, named here once.

    <artifacts>/runs/<window end>/<params fingerprint>/      one run (RunPaths)
        extract/    interactions.parquet products.parquet older_negatives.parquet report.json
        experiment/ analysis.json (the running experiment's analysis before train; empty without one)
        matrix/     manifest.json users.parquet items.parquet
                    full.npz train.npz exclude.npz train_exclude.npz holdout.npz baskets.npz
                    new_items.parquet content.npz new_exclude.npz
        model/      manifest.json factors_full.npz factors_holdout.npz
        eval/       report.json report.html (the operators' page: plots, self-contained)
        published/  published.json (the run went live)
    <artifacts>/tuned/latest.json (the active result), result-<tuned at>-<id>.json (every result)

The same names hold locally and in the shared artifact store (``recsys.core.artifacts``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from recsys.core import artifacts
from recsys.core.artifacts import ArtifactStore
from recsys.core.params import PipelineParams
from recsys.core.settings import Settings
from recsys.core.window import Window, stamp

RUNS, TUNED = "runs", "tuned"
EXTRACT, MATRIX, MODEL, EVALUATION, PUBLISHED = "extract", "matrix", "model", "eval", "published"
EXPERIMENT, EXPERIMENT_ANALYSIS = "experiment", "analysis.json"

# extract/
INTERACTIONS, PRODUCTS, EXTRACT_REPORT = "interactions.parquet", "products.parquet", "report.json"
# (user, product) pairs with negative feedback from before the window: excluded for good
OLDER_NEGATIVES = "older_negatives.parquet"
# matrix/ (CSR matrices user x item) and model/ (factors)
MANIFEST = "manifest.json"
USERS, ITEMS = "users.parquet", "items.parquet"
FULL, TRAIN, EXCLUDE, TRAIN_EXCLUDE, HOLDOUT = "full.npz", "train.npz", "exclude.npz", "train_exclude.npz", "holdout.npz"
BASKETS = "baskets.npz"  # baskets x items (recsys.ml.co_purchase), the whole window
# new products: active ones with no interaction in the window (recsys.pipeline.new_products);
# content.npz holds the TF-IDF rows of the items, then of the new products
NEW_ITEMS, CONTENT, NEW_EXCLUDE = "new_items.parquet", "content.npz", "new_exclude.npz"
FACTORS_FULL, FACTORS_HOLDOUT = "factors_full.npz", "factors_holdout.npz"
# model/: the experiment running when train ran (Experiment.snapshot()), and variants/<name>/, the
# model of each of its variants whose training params differ (its FACTORS_FULL; the model MANIFEST
# lists them)
EXPERIMENT, VARIANTS = "experiment.json", "variants"
# eval/ and published/
EVALUATION_REPORT, EVALUATION_HTML, PUBLISHED_MARKER = "report.json", "report.html", "published.json"
# tuned/
TUNED_LATEST, TUNED_RESULT_PREFIX = "latest.json", "result-"


@dataclass(frozen=True)
class RunPaths:
    artifacts_dir: Path  # this worker's local artifacts folder
    key: str  # the run's folder relative to it, and to the store: runs/<window end>/<fingerprint>

    @property
    def root(self) -> Path:
        return self.artifacts_dir / self.key

    @property
    def extract(self) -> Path:
        return self.root / EXTRACT

    @property
    def experiment(self) -> Path:
        return self.root / EXPERIMENT

    @property
    def matrix(self) -> Path:
        return self.root / MATRIX

    @property
    def model(self) -> Path:
        return self.root / MODEL

    @property
    def evaluation(self) -> Path:
        return self.root / EVALUATION

    @property
    def published(self) -> Path:
        return self.root / PUBLISHED

    @property
    def lock(self) -> Path:
        return self.artifacts_dir / f"{self.key}.lock"


def run_paths(settings: Settings, window: Window, params: PipelineParams) -> RunPaths:
    return RunPaths(settings.artifacts_dir, f"{RUNS}/{stamp(window.end)}/{params.fingerprint()}")


def window_end_of(key: str) -> str:
    """The window end stamp in a run folder key."""
    return key.split("/")[1]


def configured_store(settings: Settings) -> ArtifactStore | None:
    """The shared store, or None when artifacts stay in the local folder only."""
    if not settings.artifacts_url:
        return None
    return artifacts.open_store(settings.artifacts_url, settings.artifacts_storage_options)


def pull_folders(run_store: ArtifactStore, paths: RunPaths, folders: tuple[str, ...]) -> None:
    for folder in folders:
        artifacts.pull(run_store, f"{paths.key}/{folder}", paths.root / folder)


def published_artifacts(settings: Settings, meta: dict) -> tuple[Path, Path]:
    """(matrix folder, full model factors) of a published version on this host: pulled from the
    shared store into the local artifacts folder when the version was published through one,
    else where its publisher wrote them (one machine, or a shared volume)."""
    run_store, key = configured_store(settings), meta.get("artifacts_key")
    if run_store is None or key is None:
        return Path(meta["matrix_dir"]), Path(meta["model_path"])
    paths = RunPaths(settings.artifacts_dir, key)
    pull_folders(run_store, paths, (MATRIX, MODEL))
    return paths.matrix, paths.model / FACTORS_FULL


RUN_KEY = re.compile(rf"^{RUNS}/[0-9]{{8}}T[0-9]{{6}}Z/[0-9a-f]{{6,64}}$")


def is_run_key(key: str) -> bool:
    """Whether ``key`` is a run folder key (``runs/<window end>/<fingerprint>``), nothing more: a key
    read back from the history or a meta never leads outside the artifacts folder."""
    return RUN_KEY.fullmatch(key) is not None


def run_report(settings: Settings, key: str) -> Path | None:
    """The evaluation report (``eval/report.html``) of run folder ``key`` on this host: pulled from the
    shared store when one is configured (the run may have been evaluated on another worker), else
    from the local artifacts folder; None if the run has none."""
    if not is_run_key(key):
        return None
    paths = RunPaths(settings.artifacts_dir, key)
    run_store = configured_store(settings)
    if run_store is not None:
        try:
            pull_folders(run_store, paths, (EVALUATION,))
        except FileNotFoundError:
            return None
    report = paths.evaluation / EVALUATION_HTML
    return report if report.is_file() else None


def published_report(settings: Settings, meta: dict) -> Path | None:
    """The evaluation report of a published version on this host: its run's in the shared store
    when the version was published through one, else next to its publisher's matrix folder (one
    machine, or a shared volume); None if it has none."""
    key = meta.get("artifacts_key")
    if key is not None and configured_store(settings) is not None:
        return run_report(settings, key)
    if "matrix_dir" not in meta:
        return None
    report = Path(meta["matrix_dir"]).parent / EVALUATION / EVALUATION_HTML
    return report if report.is_file() else None
