"""The shared artifact store: push/pull against a ``file://`` store, and stages of one run on two
workers with separate local caches (real PostgreSQL and Redis)."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.core import artifacts
from recsys.core.artifacts import ArtifactStore, open_store, pull, push, pushed
from recsys.core.layout import EVALUATION, EXTRACT, FACTORS_FULL, MATRIX, MODEL
from recsys.core.params import PipelineParams
from recsys.core.settings import Settings
from recsys.pipeline.stages import (
    Run,
    evaluate_stage,
    extract_stage,
    matrix_stage,
    plan_run,
    publish_stage,
    train_stage,
    tune_stage,
)
from recsys.pipeline.tune import tuned_path, with_tuned
from recsys.storage import connect
from recsys.storage.reads import live_meta


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_dir: Path) -> ArtifactStore:
    return open_store(store_dir.as_uri())


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)


def read_files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


FILES = {"manifest.json": b'{"a": 1}', "full.npz": b"x" * 1000, "nested/users.parquet": b"users"}


def test_pull_gives_back_what_was_pushed_and_keeps_what_is_already_there(store, tmp_path):
    write_files(tmp_path / "produced", FILES)
    push(store, tmp_path / "produced", "runs/r1/matrix")
    assert store.url("runs/r1/matrix").startswith("file://")

    cache = tmp_path / "cache"
    pull(store, "runs/r1/matrix", cache)
    assert read_files(cache) == FILES
    kept_inode = (cache / "full.npz").stat().st_ino
    (cache / "manifest.json").write_bytes(b'{"b": 2}')  # same size, other content: not the pushed file
    (cache / "left-from-an-older-upload.npz").write_bytes(b"old")

    pull(store, "runs/r1/matrix", cache)
    assert read_files(cache) == FILES
    assert (cache / "full.npz").stat().st_ino == kept_inode  # not downloaded again


def test_a_new_push_replaces_the_folder_and_removes_the_old_upload(store, store_dir, tmp_path):
    write_files(tmp_path / "first", FILES)
    first = push(store, tmp_path / "first", "model")
    write_files(tmp_path / "second", {"full.npz": b"y" * 10})
    second = push(store, tmp_path / "second", "model")

    assert pushed(store, "model") == second
    assert sorted(path.name for path in (store_dir / "model").iterdir()) == sorted([artifacts.MARKER, second.upload_id])
    assert first.upload_id != second.upload_id
    pull(store, "model", tmp_path / "cache")
    assert read_files(tmp_path / "cache") == {"full.npz": b"y" * 10}


def fail_on_second_upload(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker dies while uploading: the first file arrives, the second does not."""
    uploads: list[str] = []
    put_file = store.fs.put_file

    def interrupted(local: str, remote: str, **kwargs) -> None:
        uploads.append(remote)
        if len(uploads) == 2:
            raise ConnectionError("worker lost")
        put_file(local, remote, **kwargs)

    monkeypatch.setattr(store.fs, "put_file", interrupted)


def test_an_interrupted_push_is_not_taken_as_complete(store, tmp_path, monkeypatch):
    write_files(tmp_path / "produced", FILES)
    with monkeypatch.context() as patch:
        fail_on_second_upload(store, patch)
        with pytest.raises(ConnectionError):
            push(store, tmp_path / "produced", "runs/r1/extract")
    assert pushed(store, "runs/r1/extract") is None
    with pytest.raises(FileNotFoundError, match="has no complete upload"):
        pull(store, "runs/r1/extract", tmp_path / "cache")


def test_an_interrupted_rerun_leaves_the_previous_upload_readable(store, tmp_path, monkeypatch):
    write_files(tmp_path / "first", FILES)
    complete = push(store, tmp_path / "first", "runs/r1/extract")
    write_files(tmp_path / "rerun", {name: content.upper() for name, content in FILES.items()})
    with monkeypatch.context() as patch:
        fail_on_second_upload(store, patch)
        with pytest.raises(ConnectionError):
            push(store, tmp_path / "rerun", "runs/r1/extract")
    assert pushed(store, "runs/r1/extract") == complete
    pull(store, "runs/r1/extract", tmp_path / "cache")
    assert read_files(tmp_path / "cache") == FILES


def worker(settings: Settings, store_dir: Path, cache: Path) -> Settings:
    """One worker's settings: the shared store, its own local artifacts folder."""
    return settings.model_copy(update={"artifacts_url": store_dir.as_uri(), "artifacts_dir": cache})


def test_a_second_worker_with_an_empty_cache_runs_the_later_stages(settings, demo_loaded, window_end, tmp_path):
    first = worker(settings, tmp_path / "store", tmp_path / "worker-a")
    second = worker(settings, tmp_path / "store", tmp_path / "worker-b")
    run = plan_run(first, window_end, PipelineParams())
    extract_stage(first, run)
    matrix_stage(first, run)

    # what an XCom carries to another machine: no local path of the first worker
    elsewhere = Run.from_dict(run.to_dict(), second)
    assert elsewhere.paths.root == tmp_path / "worker-b" / run.paths.key
    train_stage(second, elsewhere)
    evaluate_stage(second, elsewhere)
    result = publish_stage(second, elsewhere)

    meta = live_meta(*connect(settings))
    assert meta["version"] == result.version and meta["counts"]["users"] == result.users > 100
    assert not elsewhere.paths.extract.exists()  # only the folders a stage reads are pulled
    assert elsewhere.paths.matrix.is_dir() and not run.paths.model.exists()
    for folder in (EXTRACT, MATRIX, MODEL, EVALUATION):
        assert pushed(run.store, f"{run.paths.key}/{folder}") is not None

    # the HTTP API on a third host loads the live model from the store, not from worker-b's disk
    from recsys.serving.live_model import load_live_model

    assert meta["artifacts_key"] == run.paths.key
    api_host = worker(settings, tmp_path / "store", tmp_path / "api-host")
    live = load_live_model(meta, api_host)
    assert live.version == result.version and len(live.user_index) >= meta["counts"]["users"] > 100
    assert (tmp_path / "api-host" / run.paths.key / MODEL / FACTORS_FULL).is_file()


def test_tuned_params_reach_every_worker_through_the_store(settings, demo_loaded, window_end, tmp_path):
    tuner = worker(settings, tmp_path / "store", tmp_path / "worker-a")
    search = plan_run(tuner, window_end, PipelineParams(confidence_scaling="none"), use_tuned=False)
    extract_stage(tuner, search)
    matrix_stage(tuner, search)
    tuned = tune_stage(tuner, search, n_trials=2)

    other = worker(settings, tmp_path / "store", tmp_path / "worker-b")
    planned = plan_run(other, window_end, PipelineParams())
    assert planned.params == with_tuned(PipelineParams(), tuned)
    assert tuned_path(other).read_bytes() == tuned_path(tuner).read_bytes()
