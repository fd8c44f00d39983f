"""Exceptions that tell an operator what is wrong and whether retrying can help, and the one line
the ``recsys`` command prints for any error.

``InputError`` and its subclasses mean the data or the parameters are wrong: retrying the same
task cannot succeed, so the DAG fails such a task at once instead of waiting out its retries.
"""


class RecsysError(Exception):
    """Base class for every error this package raises on purpose."""


class InputError(RecsysError):
    """The input data or parameters are unusable; retrying will not help."""


class ConfigurationError(InputError):
    """A setting is unusable (e.g. ``RECSYS_DB_SCHEMA`` is not a schema name); raised before any
    connection is made."""


class EmptyWindowError(InputError):
    """The requested time window holds no interactions at all."""


class NoValidDataError(InputError):
    """Interactions exist, but too few of them survive validation."""


class QualityGateError(RecsysError):
    """The trained model is not good enough to publish."""


class StaleVersionError(RecsysError):
    """A fresher version is already live; publishing this one would go back in time."""


class EmptyResultError(RecsysError):
    """A publish would make an empty or incomplete set of recommendations live."""


class FutureWindowError(InputError):
    """The run's data window ends after now: it would publish data that does not exist yet and
    hold back every normal run after it."""


class PublishConflictError(RecsysError):
    """Another publish attempt owns the version; waiting longer (or retrying later) can help."""


class IncompleteVersionError(RecsysError):
    """A version's staged (or kept) structures do not hold what its meta records: not switched."""


class CorruptArtifactError(RecsysError):
    """A file downloaded from the shared artifact store is not the one its upload recorded (size or
    sha256 differ): the stored object was damaged or replaced outside ``recsys``."""


class RunChangedError(RecsysError):
    """Another run of the same window rebuilt an input of this stage while it ran."""


def _address(url: str | None) -> str:
    """host:port of a configured URL, never its credentials."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url or "")
    except Exception:  # noqa: BLE001 - an unparsable URL has no address to show
        return "the configured address"
    return f"{parsed.host or 'localhost'}:{parsed.port}" if parsed.port else (parsed.host or "localhost")


# exception classes meaning "the cache Redis cannot be reached now": registered by the storage
# layer (recsys.storage.connection), the one package that talks to Redis
CACHE_UNAVAILABLE: list[type[BaseException]] = []


def describe(error: BaseException, database_url: str | None = None, redis_url: str | None = None) -> str:
    """One line for the user: what failed and what to check (the traceback is for ``--debug``);
    the configured URLs name the server that could not be reached."""
    import psycopg

    if isinstance(error, RecsysError):
        return str(error)
    if isinstance(error, psycopg.OperationalError):
        lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
        # libpq says 'connection to server at "h", port p failed: <why>', then hints
        reasons = [line.rsplit("failed: ", 1)[1] for line in lines if "failed: " in line]
        reason = reasons[0] if reasons else (lines[-1] if lines else type(error).__name__)
        return (f"cannot reach PostgreSQL at {_address(database_url)} ({reason}); "
                "set RECSYS_DATABASE_URL or run `recsys services start`")
    if isinstance(error, tuple(CACHE_UNAVAILABLE)):
        return (f"cannot reach Redis at {_address(redis_url)} ({error}); "
                "set RECSYS_REDIS_URL or run `recsys services start`")
    return f"{type(error).__name__}: {error} (run with --debug for the traceback)"
