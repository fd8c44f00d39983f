"""PostgreSQL access: connections and the SQL files under ``sql/``.

Bulk paths use COPY through psycopg 3; every statement text lives in ``sql/``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import psycopg
from psycopg import sql as pgsql

from recsys.core.redact import redact
from recsys.core.settings import Settings

_SQLALCHEMY_DRIVER = re.compile(r"^postgres(?:ql)?\+[A-Za-z0-9_]+://")


def libpq_url(url: str) -> str:
    """Accept SQLAlchemy-style URLs (``postgresql+psycopg2://``) as well as plain libpq ones.

    Only the driver suffix goes: the rest reaches libpq exactly as written (re-rendering the URL
    would decode a percent-encoded password and break it)."""
    return _SQLALCHEMY_DRIVER.sub("postgresql://", url, count=1)


def search_path_option(schema: str) -> str:
    """``-c search_path=...`` for libpq's ``options``: the schema as one double-quoted identifier
    (mixed case kept; a comma or ``-c`` inside it stays part of the name), with backslashes and
    spaces escaped as the server's option splitting requires."""
    quoted = pgsql.Identifier(schema).as_string()
    return "-c search_path=" + re.sub(r"([\\ ])", r"\\\1", quoted)


@cache
def _read_sql(sql_dir: Path, name: str) -> str:
    path = sql_dir / f"{name}.sql"
    return path.read_text()


def sql_text(settings: Settings, name: str) -> str:
    return _read_sql(settings.sql_dir, name)


def sql_with_schema(settings: Settings, name: str, schema: str) -> pgsql.Composed:
    """A statement whose ``{schema}`` placeholder is filled with a safely quoted identifier."""
    return pgsql.SQL(sql_text(settings, name)).format(schema=pgsql.Identifier(schema))


@contextmanager
def connect(settings: Settings, connect_timeout: int | None = None) -> Iterator[psycopg.Connection]:
    """A connection whose search_path is the configured schema; commits on success.
    ``connect_timeout`` (seconds) bounds the wait for an unreachable server (libpq's default: none).

    A connection error's message (libpq quotes parts of a URL it cannot parse) comes with the
    URL's password masked, and without the original exception attached."""
    url = settings.require_database_url
    try:
        conn = psycopg.connect(
            libpq_url(url),
            options=f"{search_path_option(settings.db_schema)} -c TimeZone=UTC",
            **({} if connect_timeout is None else {"connect_timeout": connect_timeout}),
        )
    except psycopg.Error as error:
        raise type(error)(redact(str(error), url)) from None
    try:
        with conn:
            yield conn
    finally:
        conn.close()


def create_schema(settings: Settings) -> None:
    """Create the schema (if needed) and the shop tables in it. Idempotent."""
    with connect(settings) as conn:
        conn.execute(sql_with_schema(settings, "create_schema", settings.db_schema))
        conn.execute(sql_text(settings, "schema"))


def drop_schema(settings: Settings) -> None:
    with connect(settings) as conn:
        conn.execute(sql_with_schema(settings, "drop_schema", settings.db_schema))
