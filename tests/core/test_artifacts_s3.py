"""The shared artifact store on a real S3-compatible server (SeaweedFS on loopback, started once for
this module): push/pull semantics over s3fs, and a publish whose steps run in processes of their
own, each with an empty local artifacts folder, reading the run from the store."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO
from object_store import S3Location, S3Server

from recsys.core.artifacts import MARKER, ArtifactStore, open_store, pull, push, pushed, sha256
from recsys.core.errors import CorruptArtifactError
from recsys.core.layout import EVALUATION, EXTRACT, MATRIX, MODEL, PUBLISHED, configured_store
from recsys.core.params import PipelineParams
from recsys.core.settings import Settings
from recsys.pipeline import history
from recsys.pipeline.stages import evaluate_stage, extract_stage, matrix_stage, plan_run, published_run, train_stage
from recsys.storage import connect
from recsys.storage.reads import live_meta
from recsys.storage.versions import live_problems

FILES = {"manifest.json": b'{"a": 1}', "full.npz": b"x" * 100_000, "nested/users.parquet": b"users"}


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return folder


def read_files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.fixture
def store(s3_store: S3Location) -> ArtifactStore:
    return open_store(s3_store.url, s3_store.storage_options)


def another_machine(s3_store: S3Location) -> ArtifactStore:
    """The same store through an s3fs client of its own (fsspec would hand back the cached one)."""
    return open_store(s3_store.url, {**s3_store.storage_options, "skip_instance_cache": True})


def objects(s3_server: S3Server, store: ArtifactStore, key: str) -> list[str]:
    """What the server holds under ``key``, listed by a fresh client (no listing cache)."""
    prefix = store.path(key) + "/"
    return sorted(path.removeprefix(prefix) for path in s3_server.filesystem().find(store.path(key)))


def test_push_writes_an_upload_and_its_marker_and_a_new_push_replaces_both(s3_server, s3_store, store, tmp_path):
    first = push(store, write_files(tmp_path / "first", FILES), "runs/r1/matrix")
    assert store.url("runs/r1/matrix").startswith(f"s3://{s3_server.bucket}/")
    assert objects(s3_server, store, "runs/r1/matrix") == sorted(
        [MARKER, *(f"{first.upload_id}/{name}" for name in FILES)]
    )
    marker = json.loads(s3_server.filesystem().cat_file(store.path("runs/r1/matrix", MARKER)))
    assert marker["files"]["full.npz"] == {"size": 100_000, "sha256": sha256(tmp_path / "first" / "full.npz")}

    second = push(store, write_files(tmp_path / "second", {"full.npz": b"y" * 10}), "runs/r1/matrix")
    # the old upload and the marker's draft are gone: only the new upload and its marker remain
    assert objects(s3_server, store, "runs/r1/matrix") == sorted([MARKER, f"{second.upload_id}/full.npz"])
    cache = tmp_path / "cache"
    assert pull(another_machine(s3_store), "runs/r1/matrix", cache) == second
    assert read_files(cache) == {"full.npz": b"y" * 10}


def test_a_second_pull_downloads_nothing_and_repairs_what_differs(s3_store, store, tmp_path, monkeypatch):
    push(store, write_files(tmp_path / "produced", FILES), "model")
    reader = another_machine(s3_store)
    cache = tmp_path / "cache"
    pull(reader, "model", cache)
    assert read_files(cache) == FILES

    downloads: list[str] = []
    get_file = reader.fs.get_file

    def counted(remote: str, local: str, **kwargs) -> None:
        downloads.append(remote)
        get_file(remote, local, **kwargs)

    monkeypatch.setattr(reader.fs, "get_file", counted)
    pull(reader, "model", cache)
    assert downloads == []
    (cache / "manifest.json").write_bytes(b'{"b": 2}')  # same size, other content
    pull(reader, "model", cache)
    assert [remote.rsplit("/", 1)[-1] for remote in downloads] == ["manifest.json"]
    assert read_files(cache) == FILES


def test_a_reader_sees_the_previous_upload_until_a_push_has_finished(s3_store, store, tmp_path, monkeypatch):
    before = push(store, write_files(tmp_path / "before", FILES), "runs/r1/extract")
    reader = another_machine(s3_store)
    seen_midway: list[dict[str, bytes]] = []
    put_file = store.fs.put_file

    def upload_and_look(local: str, remote: str, **kwargs) -> None:
        put_file(local, remote, **kwargs)
        if len(seen_midway) < 2:  # after each of the first two files of the rerun's upload
            assert pushed(reader, "runs/r1/extract") == before
            cache = tmp_path / f"reader-{len(seen_midway)}"
            pull(reader, "runs/r1/extract", cache)
            seen_midway.append(read_files(cache))

    rerun = {name: content.upper() for name, content in FILES.items()}
    with monkeypatch.context() as patch:
        patch.setattr(store.fs, "put_file", upload_and_look)
        after = push(store, write_files(tmp_path / "rerun", rerun), "runs/r1/extract")
    assert seen_midway == [FILES, FILES]
    assert pushed(reader, "runs/r1/extract") == after
    pull(reader, "runs/r1/extract", tmp_path / "reader-0")
    assert read_files(tmp_path / "reader-0") == rerun


def test_an_interrupted_push_is_never_complete(s3_server, s3_store, store, tmp_path, monkeypatch):
    put_file, uploads = store.fs.put_file, []

    def dies_on_the_second_file(local: str, remote: str, **kwargs) -> None:
        uploads.append(remote)
        if len(uploads) == 2:
            raise ConnectionError("worker lost")
        put_file(local, remote, **kwargs)

    monkeypatch.setattr(store.fs, "put_file", dies_on_the_second_file)
    with pytest.raises(ConnectionError):
        push(store, write_files(tmp_path / "produced", FILES), "runs/r1/model")
    assert len(objects(s3_server, store, "runs/r1/model")) == 1  # one file arrived, no marker
    reader = another_machine(s3_store)
    assert pushed(reader, "runs/r1/model") is None
    with pytest.raises(FileNotFoundError, match="runs/r1/model has no complete upload"):
        pull(reader, "runs/r1/model", tmp_path / "cache")


def test_a_damaged_object_is_refused_and_leaves_no_file(s3_server, s3_store, store, tmp_path):
    upload = push(store, write_files(tmp_path / "produced", FILES), "model")
    damaged = store.path("model", upload.upload_id, "full.npz")
    s3_server.filesystem().pipe_file(damaged, b"z" * 100_000)  # same size, other bytes
    cache = tmp_path / "cache"
    with pytest.raises(CorruptArtifactError, match=rf"{damaged}.* 100000 bytes .* not the 100000 bytes .*rerun"):
        pull(another_machine(s3_store), "model", cache)
    assert not (cache / "full.npz").exists()
    assert not [path for path in cache.rglob("*.part")]

    s3_server.filesystem().pipe_file(damaged, b"z")  # cut short
    with pytest.raises(CorruptArtifactError, match="has 1 bytes"):
        pull(another_machine(s3_store), "model", cache)
    assert not [path for path in cache.rglob("*") if path.name.startswith("full.npz")]


def test_a_pull_overtaken_by_a_push_starts_over_on_the_new_upload(s3_store, store, tmp_path, monkeypatch):
    push(store, write_files(tmp_path / "first", FILES), "tuned")
    reader = another_machine(s3_store)
    rerun = {"latest.json": b'{"factors": 64}'}
    get_file = reader.fs.get_file

    def overtaken(remote: str, local: str, **kwargs) -> None:
        if not (tmp_path / "rerun").exists():  # a tune on another worker replaces the folder now
            push(store, write_files(tmp_path / "rerun", rerun), "tuned")
        get_file(remote, local, **kwargs)

    monkeypatch.setattr(reader.fs, "get_file", overtaken)
    upload = pull(reader, "tuned", tmp_path / "cache")
    assert upload == pushed(store, "tuned") and set(upload.files) == {"latest.json"}
    assert read_files(tmp_path / "cache") == rerun


def test_credentials_stay_out_of_reprs_logs_and_errors(s3_server, s3_store, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RECSYS_ARTIFACTS_URL", s3_store.url)
    monkeypatch.setenv("RECSYS_ARTIFACTS_STORAGE_OPTIONS", json.dumps(s3_store.storage_options))
    settings = Settings(_env_file=None, artifacts_dir=tmp_path / "artifacts")
    assert settings.artifacts_storage_options["secret"] == s3_server.secret
    store = configured_store(settings)
    with caplog.at_level(logging.DEBUG):  # botocore and s3fs log every request at DEBUG
        push(store, write_files(tmp_path / "produced", FILES), "model")
        pull(store, "model", tmp_path / "cache")
    shown = [repr(settings), str(settings), repr(store), store.url("model"), caplog.text]

    spec = importlib.util.spec_from_file_location("recsys_dags", REPO / "dags" / "recsys_dags.py")
    dags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dags)
    # no connection named in the URL: the DAG hands it to fsspec as it is (no Airflow S3 provider here)
    in_dag = dags.recsys_settings()
    assert (in_dag.artifacts_url, in_dag.artifacts_storage_options) == (s3_store.url, s3_store.storage_options)
    shown += [repr(in_dag), str(in_dag)]

    wrong = open_store(s3_store.url, {**s3_store.storage_options, "secret": "not-" + s3_server.secret})
    with pytest.raises(PermissionError) as refused:
        push(wrong, tmp_path / "produced", "model")
    anonymous = open_store(s3_store.url, {"endpoint_url": s3_server.endpoint_url, "anon": True})
    with pytest.raises(PermissionError):
        push(anonymous, tmp_path / "produced", "model")  # no anonymous writes
    shown.append(str(refused.value))
    assert "PutObject" in caplog.text and s3_server.endpoint_url in caplog.text  # the requests were logged
    assert all(s3_server.secret not in text for text in shown)


# --- a publish whose steps run as separate DAG tasks on other machines ---------------------------


def run_step(step: str, task_input, env: dict[str, str]) -> subprocess.Popen:
    """Start one publish task (tests/publish_step.py) in a process of its own."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "publish_step.py"), step, json.dumps(task_input)], env=env, cwd=REPO,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finished(process: subprocess.Popen, secret: str):
    """What a step returned (the JSON it printed last); it must have succeeded without showing ``secret``."""
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-4000:]
    assert secret not in stdout + stderr
    return json.loads(stdout.strip().splitlines()[-1])


def worker_env(settings: Settings, s3_store: S3Location, artifacts_dir: Path) -> dict[str, str]:
    """What a worker on another machine has: the servers, the store, an empty artifacts folder of its own."""
    assert not artifacts_dir.exists()
    return {
        **os.environ,
        "RECSYS_DATABASE_URL": settings.database_url,
        "RECSYS_REDIS_URL": settings.redis_url,
        "RECSYS_DB_SCHEMA": settings.db_schema,
        "RECSYS_REDIS_PREFIX": settings.redis_prefix,
        "RECSYS_ARTIFACTS_URL": s3_store.url,
        "RECSYS_ARTIFACTS_STORAGE_OPTIONS": json.dumps(s3_store.storage_options),
        "RECSYS_ARTIFACTS_DIR": str(artifacts_dir),
    }


def test_publish_steps_in_processes_of_their_own_read_the_run_from_s3(
    s3_server, s3_store, settings, demo_loaded, window_end, tmp_path
):
    trainer = settings.model_copy(update={
        "artifacts_url": s3_store.url, "artifacts_storage_options": s3_store.storage_options,
        "artifacts_dir": tmp_path / "trainer",
    })
    run = plan_run(trainer, window_end, PipelineParams())
    extract_stage(trainer, run)
    matrix_stage(trainer, run)
    train_stage(trainer, run)
    evaluate_stage(trainer, run)
    xcom = {**run.to_dict(), "shards": 2}  # what the evaluate task hands on, as JSON

    jobs = finished(run_step("prepare", xcom, worker_env(settings, s3_store, tmp_path / "prepare")), s3_server.secret)
    shards = [run_step("shard", job, worker_env(settings, s3_store, tmp_path / f"shard-{job['shard']}")) for job in jobs]
    shard_results = [finished(process, s3_server.secret) for process in shards]  # both started before either is awaited
    published = finished(
        run_step("finish", {"run": xcom, "shard_results": shard_results}, worker_env(settings, s3_store, tmp_path / "finish")),
        s3_server.secret,
    )

    client, keys = connect(settings)
    meta = live_meta(client, keys)
    assert meta["version"] == published["version"] and meta["artifacts_key"] == run.paths.key
    assert live_problems(client, keys) == []  # every structure of the live version complete
    assert meta["counts"]["users"] == published["users"] == sum(result["users"] for result in shard_results) > 100

    # each step pulled what it reads into its own folder, byte for byte what the trainer pushed
    model = sorted(path.name for path in run.paths.model.iterdir())
    for step, folders in [("prepare", {MATRIX, MODEL}), ("shard-0", {MATRIX, MODEL}), ("shard-1", {MATRIX, MODEL}),
                          ("finish", {MATRIX, MODEL, EVALUATION, PUBLISHED})]:
        pulled = tmp_path / step / run.paths.key
        assert {path.name for path in pulled.iterdir()} == folders, step
        for name in model:
            assert sha256(pulled / MODEL / name) == sha256(run.paths.model / name), (step, name)
    assert not (run.paths.root / PUBLISHED).exists()  # the trainer's folder never saw the publish

    # the finish step recorded the publish in the store: `recsys republish` on yet another host finds it there
    store = configured_store(trainer)
    assert all(pushed(store, f"{run.paths.key}/{folder}") for folder in (EXTRACT, MATRIX, MODEL, EVALUATION, PUBLISHED))
    elsewhere = trainer.model_copy(update={"artifacts_dir": tmp_path / "republisher"})
    assert published_run(elsewhere).paths.key == run.paths.key
    (row,) = history.recent_runs(settings)
    assert row["status"] == "published" and row["published_version"] == published["version"]
