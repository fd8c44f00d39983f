"""Settings and connections: the schema name is one quoted identifier, passwords never printed."""

from __future__ import annotations

import io
import traceback
import uuid

import psycopg
import pytest
from helpers import expose_as_env, isolated_settings
from typer.testing import CliRunner

from recsys.cli import app
from recsys.core import db
from recsys.core.errors import ConfigurationError
from recsys.core.params import PipelineParams
from recsys.core.settings import Settings
from recsys.pipeline.stages import run_pipeline
from recsys.storage import connect
from recsys.storage.reads import delete_all, live_meta

runner = CliRunner()


@pytest.mark.parametrize(
    "schema", ["x -c statement_timeout=1", "a,b", "1st", "", 'a"b', "tab\there", "x" * 64, "naïve"]
)
def test_a_schema_that_is_not_an_identifier_is_refused_before_connecting(schema, monkeypatch):
    monkeypatch.setenv("RECSYS_DB_SCHEMA", schema)
    # nothing listens on port 1: a connection attempt would fail differently
    monkeypatch.setenv("RECSYS_DATABASE_URL", "postgresql://u@127.0.0.1:1/db")
    with pytest.raises(ConfigurationError) as refused:
        Settings(_env_file=None)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"RECSYS_DB_SCHEMA {schema!r} is not a schema name")

    result = runner.invoke(app, ["init-db"])
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigurationError)


@pytest.mark.parametrize("schema", ["public", "BarCase", "barcase", "_x$1", "s" * 63])
def test_identifiers_are_accepted_as_written(schema):
    assert Settings(_env_file=None, db_schema=schema).db_schema == schema


def test_search_path_holds_the_schema_as_one_quoted_identifier_whatever_it_is(settings):
    """Quoting does not rely on the validator: a value that bypassed it still cannot set a server
    option or become a list."""
    with db.connect(settings) as conn:
        default_timeout = conn.execute("SHOW statement_timeout").fetchone()[0]
    for schema in ("x -c statement_timeout=1", "a,b", "Mixed Case\\"):
        unchecked = settings.model_copy(update={"db_schema": schema})  # model_copy does not validate
        with db.connect(unchecked) as conn:
            search_path, timeout = conn.execute("SELECT current_setting('search_path'), current_setting('statement_timeout')").fetchone()
        assert timeout == default_timeout
        assert search_path == psycopg.sql.Identifier(schema).as_string()
        # the COPY drain's psycopg2 connection gets the same options
        copied = io.BytesIO()
        db.copy_to(
            unchecked,
            "COPY (SELECT current_setting('search_path'), current_setting('statement_timeout'), "
            "current_setting('TimeZone')) TO STDOUT",
            {},
            copied,
        )
        assert copied.getvalue().decode().rstrip("\n").split("\t") == [
            # COPY's text format doubles a backslash
            search_path.replace("\\", "\\\\"), default_timeout, "UTC",
        ]


def _raised(call) -> BaseException:
    with pytest.raises(psycopg.Error) as failed:
        call()
    return failed.value


def _psycopg_copy(settings: Settings, statement: str) -> None:
    with db.connect(settings) as conn, conn.cursor() as cur, cur.copy(statement, {}) as copy:
        for _ in copy:
            pass


@pytest.mark.parametrize(
    "statement",
    [
        "COPY (SELECT * FROM no_such_table) TO STDOUT",  # fails before the first row
        "COPY (SELECT 1 / (n - 3000) FROM generate_series(1, 5000) AS n) TO STDOUT",  # fails mid-stream
        "COPY (SELECT raise_custom()) TO STDOUT",  # a SQLSTATE without a class of its own
    ],
)
def test_copy_to_raises_what_psycopg_copy_raises(settings, statement):
    """db.copy_to runs on psycopg2, but callers catch psycopg (3) errors: the same class and message."""
    with db.connect(settings) as conn:
        conn.execute(
            "CREATE FUNCTION raise_custom() RETURNS int LANGUAGE plpgsql "
            "AS $$ BEGIN RAISE EXCEPTION 'custom failure' USING ERRCODE = 'XY123'; END $$"
        )
    expected = _raised(lambda: _psycopg_copy(settings, statement))
    raised = _raised(lambda: db.copy_to(settings, statement, {}, io.BytesIO()))
    assert type(raised) is type(expected)
    assert str(raised) == str(expected)


def test_copy_to_losing_the_connection_raises_an_operational_error(settings):
    """psycopg names the server's reason (AdminShutdown, a subclass); psycopg2 only sees the
    connection closed: callers catch OperationalError either way."""
    statement = "COPY (SELECT pg_terminate_backend(pg_backend_pid())) TO STDOUT"
    assert isinstance(_raised(lambda: _psycopg_copy(settings, statement)), psycopg.OperationalError)
    assert type(_raised(lambda: db.copy_to(settings, statement, {}, io.BytesIO()))) is psycopg.OperationalError


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:hunter2@127.0.0.1:1/db",  # refused
        "postgresql://u:hunter2%zz@127.0.0.1:5432/db",  # not a URL libpq reads
        "postgresql://u@127.0.0.1:5432/db?password=hunter2%zz",
    ],
)
def test_copy_to_connection_errors_are_psycopgs_without_the_password(url):
    settings = Settings(_env_file=None, database_url=url)
    expected = _raised(lambda: db.connect(settings).__enter__())
    raised = _raised(lambda: db.copy_to(settings, "COPY (SELECT 1) TO STDOUT", {}, io.BytesIO()))
    assert type(raised) is type(expected)
    printed = "".join(traceback.format_exception(raised))
    assert "hunter2" not in printed


@pytest.fixture
def mixed_case_settings(service_urls, tmp_path):
    settings = isolated_settings(service_urls, tmp_path / "artifacts", f"Test_MixedCase_{uuid.uuid4().hex[:10]}")
    try:
        yield settings
    finally:
        db.drop_schema(settings)
        delete_all(*connect(settings))


def _schemas_named(settings: Settings, name: str) -> list[str]:
    with db.connect(settings.model_copy(update={"db_schema": "public"})) as conn:
        rows = conn.execute("SELECT nspname FROM pg_namespace WHERE lower(nspname) = lower(%s)", [name]).fetchall()
    return [row[0] for row in rows]


def test_mixed_case_schema_through_demo_data_and_the_whole_pipeline(mixed_case_settings, window_end, monkeypatch):
    settings = mixed_case_settings
    expose_as_env(settings, monkeypatch)
    loaded = runner.invoke(app, ["demo-data", "--users", "400", "--products", "120", "--days", "60",
                                 "--end", window_end.isoformat()])
    assert loaded.exit_code == 0, loaded.output
    # the tables are in the schema as written, not in a lower-cased one
    assert _schemas_named(settings, settings.db_schema) == [settings.db_schema]

    result = run_pipeline(settings, window_end, PipelineParams(factors=16))
    assert result.extract.rows_kept > 5_000
    assert result.publish.users > 300
    assert live_meta(*connect(settings))["version"] == result.publish.version

    db.drop_schema(settings)
    assert _schemas_named(settings, settings.db_schema) == []


def test_settings_repr_and_str_mask_url_passwords():
    settings = Settings(
        _env_file=None,
        database_url="postgresql://u:hunter2@h/db",
        redis_url="redis://:hunter2@h:6379/0",
        artifacts_url="s3://bucket/recsys?password=hunter2",
    )
    for shown in (repr(settings), str(settings), f"{settings!r}"):
        assert "hunter2" not in shown
        assert "postgresql://u:***@h/db" in shown
        assert "redis://:***@h:6379/0" in shown
        assert "s3://bucket/recsys?password=***" in shown
    # callers still read the real URLs
    assert settings.database_url == "postgresql://u:hunter2@h/db"
    assert settings.redis_url == "redis://:hunter2@h:6379/0"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:hunter2%zz@127.0.0.1:5432/db",  # libpq: invalid percent-encoded token: "hunter2%zz"
        "postgresql://u:hunter2@[::1/db",  # libpq quotes the whole URI
        "postgresql://u@127.0.0.1:5432/db?password=hunter2%zz",
    ],
)
def test_connection_errors_do_not_show_the_password(url):
    settings = Settings(_env_file=None, database_url=url)
    with pytest.raises(psycopg.Error) as failed:
        with db.connect(settings):
            pass
    printed = "".join(traceback.format_exception(failed.value))
    assert "hunter2" not in printed
    assert "***" in str(failed.value)


def test_sqlalchemy_style_urls_reach_libpq_unchanged_but_for_the_driver(service_urls):
    assert db.libpq_url("postgresql+psycopg2://u:p%20w%40x@h:5432/db?sslmode=require") == (
        "postgresql://u:p%20w%40x@h:5432/db?sslmode=require"
    )
    assert db.libpq_url("postgres://u@h/db") == "postgres://u@h/db"
    url = service_urls.database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    with db.connect(Settings(_env_file=None, database_url=url)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
