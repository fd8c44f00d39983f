"""Helpers shared by the tests (fixtures are in conftest.py): writing shop rows as a shop would,
staging a run, and running the ``recsys`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

from recsys import storage
from recsys.core import db
from recsys.core.layout import EVALUATION_REPORT, run_paths
from recsys.core.settings import Settings
from recsys.core.window import window_ending
from recsys.local import services
from recsys.storage.reads import LiveBuild, live_build

REPO = Path(__file__).resolve().parents[1]


def services_dir() -> Path:
    """A data dir for embedded servers. Not pytest's tmp_path: run as root, embedded PostgreSQL
    serves as its own system user, which must be able to pass through every parent directory, and
    pytest's base temp dir is root-only (start_postgres opens the data dir itself)."""
    return Path(tempfile.mkdtemp(prefix="recsys-test-services-"))


INTERACTION_FIELDS = ("user_id", "product_id", "event_type", "value", "occurred_at")
PRODUCT_FIELDS = ("product_id", "name", "category", "active")


def insert_interactions(settings: Settings, rows: list[tuple]) -> None:
    """Insert (user_id, product_id, event_type, value, occurred_at) rows as a shop would."""
    with db.connect(settings) as conn, conn.cursor() as cur:
        cur.executemany(db.sql_text(settings, "insert_interaction"), [dict(zip(INTERACTION_FIELDS, row, strict=True)) for row in rows])


def insert_products(settings: Settings, rows: list[tuple]) -> None:
    """Insert or update (product_id, name, category, active) rows."""
    with db.connect(settings) as conn, conn.cursor() as cur:
        cur.executemany(db.sql_text(settings, "upsert_product"), [dict(zip(PRODUCT_FIELDS, row, strict=True)) for row in rows])


def days_before(end: datetime, days: float) -> datetime:
    return end - timedelta(days=days)


def run_recsys_json(args: list[str], servers: services.LocalServices, path: str, timeout: int = 600) -> dict:
    """``recsys ARGS`` in a subprocess with PATH set to ``path`` and the given servers; returns
    the JSON object that ends its stdout."""
    env = {**os.environ, "PATH": path, **servers.env()}
    command = [sys.executable, "-c", "from recsys.cli import app; app()", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def stage(settings, window_end, params):
    """extract, matrix and train for ``window_end``; returns the run's paths."""
    from recsys.pipeline.extract import extract, extracted_id_types
    from recsys.pipeline.matrix import build_matrix
    from recsys.pipeline.train import train

    window = window_ending(window_end, params)
    paths = run_paths(settings, window, params)
    extracted = extract(settings, window, paths.extract, params)
    build_matrix(
        extracted.interactions, extracted.products, window, paths.matrix, params, extracted_id_types(paths.extract)
    )
    train(paths.matrix, paths.model, params)
    paths.evaluation.mkdir(parents=True)
    (paths.evaluation / EVALUATION_REPORT).write_text(json.dumps({"model": {}, "popularity": {}}))
    return paths


def file_alerts(skipped: bool = False):
    """A notifier factory for RECSYS_ALERT_NOTIFIER: appends each alert to RECSYS_TEST_ALERTS_FILE."""
    from airflow.sdk import BaseNotifier

    class FileAlert(BaseNotifier):
        def notify(self, context) -> None:
            kind = "skipped" if skipped else "failed"
            with open(os.environ["RECSYS_TEST_ALERTS_FILE"], "a") as out:
                # an alert of a task that goes on carries its text as recsys_alert
                said = context.get("recsys_alert") or context.get("exception")
                out.write(f"{kind} {context['ti'].task_id} {said}\n")

    return FileAlert()


def isolated_settings(servers: services.LocalServices, artifacts_dir: Path, db_schema: str) -> Settings:
    """Settings of one test: its own schema, Redis prefix and artifacts folder on the test servers."""
    tag = db_schema.rsplit("_", 1)[-1]
    return Settings(
        _env_file=None,
        database_url=servers.database_url,
        redis_url=servers.redis_url,
        db_schema=db_schema,
        redis_prefix=f"test-{tag}",
        artifacts_dir=artifacts_dir,
    )


def expose_as_env(settings: Settings, monkeypatch) -> None:
    """``settings`` as RECSYS_* variables, for code that builds its own Settings (DAG, CLI)."""
    for name, value in {
        "RECSYS_DATABASE_URL": settings.database_url,
        "RECSYS_REDIS_URL": settings.redis_url,
        "RECSYS_DB_SCHEMA": settings.db_schema,
        "RECSYS_REDIS_PREFIX": settings.redis_prefix,
        "RECSYS_ARTIFACTS_DIR": str(settings.artifacts_dir),
    }.items():
        monkeypatch.setenv(name, value)


@contextmanager
def served_in_thread(app) -> Iterator[str]:
    """``app`` under a real uvicorn on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=services.free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


def live(settings: Settings) -> LiveBuild:
    """The live build under the test's prefix (there must be one)."""
    found = live_build(*storage.connect(settings))
    assert found is not None, "nothing is live"
    return found


def published_entries(settings: Settings, structure: str = "user_recs") -> dict[str, dict]:
    """Every entry of a live bucketed structure, by id."""
    return dict(live(settings).entries(structure))


def stray_builds(settings: Settings) -> set[str]:
    """Builds with keys in Redis that are neither live nor kept (an attempt's leftovers)."""
    from recsys.storage.builds import pointer
    from recsys.storage.reads import all_keys

    client, keys = storage.connect(settings)
    found = set()
    for key in all_keys(client, keys):
        parts = keys.bucket_key_parts(key) or keys.tagged_build(key)
        if parts is not None:
            found.add(parts[0])
    live_now = (pointer(client, keys) or {}).get("build")
    return found - {live_now} - set(client.lrange(keys.history(), 0, -1))


def simulated_experiment(settings: Settings, name: str, lift: float, users: int = 2_000, seed: int = 3, days: int = 4):
    """An experiment running now (started ``days`` ago: control and treatment, 50/50, guarded on
    click-through) with the traffic ``recsys bench abtest`` simulates until now written to the
    exposures and events tables: the treatment's shoppers follow lists at (1 + ``lift``) x the
    control's rate."""
    from dataclasses import replace
    from datetime import UTC

    import numpy as np

    from recsys.bench.abtest import _simulate
    from recsys.core import experiments
    from recsys.core.experiments import Experiment, Guardrail, Variant

    now = datetime.now(UTC)
    started = experiments.start_experiment(settings, Experiment(
        name=name, variants=(Variant("control", 0.5), Variant("treatment", 0.5, {"diversity_lambda": 0.0})),
        guardrails=(Guardrail("click_through"),), starts_at=now - timedelta(days=days),
    ), now=now)
    # served from the start until now (the stored experiment runs on: until stopped)
    exposures, events = _simulate(replace(started, ends_at=now), np.random.default_rng(seed), users, 0.1, lift, 3.0)
    with db.connect(settings) as conn, conn.cursor() as cursor:
        with cursor.copy(db.sql_text(settings, "load_exposures")) as copy:
            copy.write(exposures)
        with cursor.copy(db.sql_text(settings, "load_outcome_events")) as copy:
            copy.write(events)
    return started


def serve_experiment(settings: Settings, experiment, at: datetime) -> dict[str, str]:
    """Make the live version serve ``experiment`` as publish does (docs/experiments.md): its meta's
    ``experiment`` is the snapshot, and every user enrolled at ``at`` has their entry name the
    experiment and their variant after ``recommended_products`` (the lists stay as published: the
    API reads the names, not how the lists were scored). The enrolled users' variants, by user."""
    from recsys.storage.keys import bucket_of

    build = live(settings)
    enrolled = {}
    pipe = build.client.pipeline(transaction=False)
    for user_id, entry in build.entries("user_recs"):
        assigned = experiment.assign(user_id, at)
        if assigned.enrolled:
            enrolled[user_id] = assigned.variant
            tagged = {**entry, "experiment": experiment.name, "variant": assigned.variant}
            pipe.hset(build.keys.data(build.name, bucket_of(user_id, build.keys.buckets), "user_recs"), user_id,
                      json.dumps(tagged, separators=(",", ":")))
    pipe.hset(build.keys.meta(build.name), "experiment", json.dumps(experiment.snapshot()))
    pipe.execute()
    return enrolled
