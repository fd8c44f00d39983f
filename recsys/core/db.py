"""PostgreSQL access: connections and the SQL files under ``sql/``.

Bulk paths use COPY through psycopg 3, except ``copy_to``: it drains ``COPY ... TO STDOUT``
through psycopg2, whose C loop hands each row over for far less CPU than a Python loop over
psycopg 3's rows, and raises its errors as psycopg 3's. Every statement text lives in ``sql/``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import psycopg
from psycopg import sql as pgsql

from recsys.core.redact import redact
from recsys.core.settings import Settings

if TYPE_CHECKING:
    import psycopg2

_SQLALCHEMY_DRIVER = re.compile(r"^postgres(?:ql)?\+[A-Za-z0-9_]+://")
# the exception classes DB-API 2 names, in psycopg and psycopg2 alike
_DB_API_ERRORS = {
    "Error", "InterfaceError", "DatabaseError", "DataError", "OperationalError", "IntegrityError", "InternalError",
    "ProgrammingError", "NotSupportedError",
}


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


def _connection_options(settings: Settings) -> str:
    return f"{search_path_option(settings.db_schema)} -c TimeZone=UTC"


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
            options=_connection_options(settings),
            **({} if connect_timeout is None else {"connect_timeout": connect_timeout}),
        )
    except psycopg.Error as error:
        raise type(error)(redact(str(error), url)) from None
    try:
        with conn:
            yield conn
    finally:
        conn.close()


def copy_to(settings: Settings, statement: str, params: dict, file: BinaryIO) -> None:
    """Every row of ``statement`` (a ``COPY ... TO STDOUT``, its ``%(name)s`` parameters merged
    in client-side, as psycopg's ``copy()`` does) written to ``file``, one ``write`` per row.

    Through psycopg2's ``copy_expert``: a C loop per row, where iterating psycopg 3's ``Copy``
    (or even calling libpq's ``get_copy_data`` from Python) spends most of the drain's CPU in
    the interpreter (5.8 M rows: 2.4 CPU-s against 3.9 for the Python loop over libpq). The
    connection is ``connect``'s (the schema's search_path, UTC, the URL as libpq reads it) and
    commits on success; a failure raises the psycopg 3 exception ``connect`` and psycopg's
    ``copy()`` would (``psycopg_error``), so callers catch one family of errors. A COPY cut
    short (the server gone, the statement failing mid-stream) raises: it never just ends."""
    import psycopg2  # here: the processes that never drain a COPY (the API) do not load a second libpq

    url = settings.require_database_url
    try:
        conn = psycopg2.connect(libpq_url(url), options=_connection_options(settings))
    except psycopg2.Error as error:
        raise psycopg_error(error, url) from None
    try:
        with conn.cursor() as cursor:
            cursor.copy_expert(cursor.mogrify(statement, params), file)
        conn.commit()
    except psycopg2.Error as error:
        raise psycopg_error(error, url) from error
    finally:
        # mid-COPY (``file`` failed, or the server did) no rollback is possible: closing ends
        # the COPY on the server too
        conn.close()


def psycopg_error(error: psycopg2.Error, url: str) -> psycopg.Error:
    """The psycopg 3 exception for a psycopg2 one, its message kept (passwords of ``url``
    masked): the class of its SQLSTATE (``psycopg.errors.UndefinedTable``, ``AdminShutdown``...),
    else psycopg's DB-API class of the same name (``OperationalError`` for a connection that
    failed or was lost)."""
    kind = None
    if error.pgcode:
        try:
            kind = psycopg.errors.lookup(error.pgcode)
        except KeyError:  # a SQLSTATE psycopg does not know: its DB-API class below
            pass
    if kind is None:
        kind = next(getattr(psycopg, base.__name__) for base in type(error).__mro__ if base.__name__ in _DB_API_ERRORS)
    return kind(redact(str(error).rstrip("\n"), url))


def create_schema(settings: Settings) -> None:
    """Create the schema (if needed) and the shop tables in it. Idempotent."""
    with connect(settings) as conn:
        conn.execute(sql_with_schema(settings, "create_schema", settings.db_schema))
        conn.execute(sql_text(settings, "schema"))


def drop_schema(settings: Settings) -> None:
    with connect(settings) as conn:
        conn.execute(sql_with_schema(settings, "drop_schema", settings.db_schema))
