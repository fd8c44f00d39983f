"""Exceptions that tell an operator what is wrong and whether retrying can help.

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
