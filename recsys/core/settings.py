"""Where things live: database, Redis, artifacts. Read from ``RECSYS_*`` environment variables.

Secrets (passwords inside URLs, object store credentials) come only from the environment or from
Airflow connections, which the DAG resolves and passes in; nothing here has a default that embeds
a password.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from recsys.core.errors import ConfigurationError
from recsys.core.redact import mask_url

# written by `recsys services start` in the working folder; real environment variables win over it
LOCAL_SERVICES_ENV = Path(".recsys") / "services.env"
# the SQL statements, shipped in the package (the repository's top-level sql/ folder)
PACKAGED_SQL = resources.files("recsys.sql")
# A plain identifier of at most 63 bytes (PostgreSQL's limit): used quoted everywhere, so mixed case
# is kept as written, and nothing in it can read as a list, an option or SQL.
SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")
# may hold user:password@ or ?password=: shown masked in every repr and str
URL_FIELDS = ("database_url", "redis_url", "artifacts_url")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_", env_file=LOCAL_SERVICES_ENV, extra="ignore")

    def __repr_args__(self):
        for name, value in super().__repr_args__():
            yield name, (mask_url(value) if name in URL_FIELDS and isinstance(value, str) else value)

    database_url: str | None = Field(
        default=None, description="Shop database, e.g. postgresql://user:pw@host:5432/shop"
    )
    db_schema: str = Field(default="public", description="Schema that holds the shop tables")

    @field_validator("db_schema")
    @classmethod
    def _schema_is_an_identifier(cls, value: str) -> str:
        # not a ValueError, which pydantic would wrap into a multi-line ValidationError: one line,
        # and an InputError, so the DAG fails the task at once instead of retrying it
        if not SCHEMA_NAME.fullmatch(value):
            raise ConfigurationError(
                f"RECSYS_DB_SCHEMA {value!r} is not a schema name: 1 to 63 letters, digits, _ or $, "
                "not starting with a digit"
            )
        return value

    redis_url: str | None = Field(
        default=None,
        description="Cache Redis: redis://host:6379/0 for one node, redis+cluster://host:port[,host:port...] for "
        "a Redis Cluster (docs/scaling.md)",
    )
    redis_prefix: str = Field(default="recsys", description="Prefix of every Redis key we write")
    redis_buckets: int = Field(
        default=64, ge=1, le=4096,
        description="Buckets each published structure is split into (by a hash of the id): on a cluster, each "
        "its own slot. Takes effect with the next publish; each build records its own",
    )

    @field_validator("redis_prefix")
    @classmethod
    def _prefix_is_plain(cls, value: str) -> str:
        # it goes inside the {...} hash tag of every key and into SCAN patterns
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
            raise ConfigurationError(
                f"RECSYS_REDIS_PREFIX {value!r} must be 1 to 64 letters, digits, '_', '.' or '-'"
            )
        return value
    artifacts_dir: Path = Field(
        default=Path("artifacts"),
        description="Local artifacts (relative to the working folder unless absolute); with artifacts_url set, "
        "this worker's cache of the shared store",
    )
    artifacts_url: str | None = Field(
        default=None,
        description="Shared artifact store every worker reads and writes (fsspec URL, e.g. s3://bucket/recsys); "
        "unset: artifacts stay in artifacts_dir only",
    )
    artifacts_storage_options: dict[str, Any] = Field(
        default_factory=dict,
        repr=False,  # may hold credentials
        description='fsspec options of the store\'s filesystem, JSON, e.g. {"endpoint_url": "http://minio:9000"}',
    )
    sql_dir: Path = Field(
        default=Path(str(PACKAGED_SQL)), description="The SQL statements (a copy of the packaged ones, to adapt them)"
    )
    previous_version_ttl_seconds: int = Field(
        default=24 * 3600, ge=1, description="How long a replaced version is kept (readable, and for rollback)"
    )
    keep_versions: int = Field(
        default=1, ge=0, description="Replaced versions kept for rollback, newest first (0: none)"
    )
    publish_lock_ttl_seconds: float = Field(
        default=60.0, gt=0, description="A publisher's lock on its version lapses this long after it stops renewing"
    )
    publish_lock_wait_seconds: float = Field(
        default=900.0, ge=0, description="How long a publisher waits for another publisher of the same version"
    )
    user_id_type: Literal["int", "str"] | None = Field(
        default=None, description="Publish user ids as JSON integers or strings; unset: as live, else inferred"
    )
    product_id_type: Literal["int", "str"] | None = Field(
        default=None, description="Publish product ids as JSON integers or strings; unset: as live, else inferred"
    )
    run_lock_wait_seconds: float = Field(
        default=3600.0, ge=0, description="How long a stage waits for another process working on the same run folder"
    )
    tuned_max_age_days: float = Field(
        default=28.0, gt=0,
        description="Tuned params older than this are replaced by the next tune's result even when it is not "
        "better; younger ones only by a result better on a comparable validation window",
    )
    max_clock_skew_seconds: float = Field(
        default=300.0, ge=0, description="Clock drift allowed: a run's window, or an API event's timestamp, may be this far after now"
    )

    @property
    def require_database_url(self) -> str:
        if not self.database_url:
            raise RuntimeError(
                "No database configured: set RECSYS_DATABASE_URL "
                "(or run `recsys services start` for embedded local servers)"
            )
        return self.database_url

    @property
    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise RuntimeError(
                "No Redis configured: set RECSYS_REDIS_URL "
                "(or run `recsys services start` for embedded local servers)"
            )
        return self.redis_url

    # --- HTTP API security (`recsys serve`, recsys/api.py; docs/security.md) ---
    api_keys: str | None = Field(
        default=None,
        repr=False,  # secrets
        description="API keys, comma-separated scope:key pairs; scope read or write (write implies read)",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="File of more scope:key entries (comma- or line-separated), e.g. a mounted secret",
    )
    api_public_reads: bool = Field(default=False, description="Serve GET endpoints without a key")
    api_write_rate: int = Field(default=6000, ge=1, description="Events per minute each write key may POST")
    api_max_body_bytes: int = Field(
        default=64 * 1024, ge=4096,
        description="Largest request body accepted; a larger one is answered 413 before it is read or parsed "
        "(a cart of 100 ids of 128 characters is about 13 KB)",
    )
    api_refresh_retry_seconds: float = Field(
        default=5, gt=0, description="How often lists left stale while Redis was down are retried"
    )
    api_exposure_flush_seconds: float = Field(
        default=1.0, gt=0, le=60,
        description="How often each API process writes the lists it served to experiment users to "
        "recommendation_exposures (one COPY, in the background)",
    )
    api_exposure_buffer_rows: int = Field(
        default=100_000, ge=100,
        description="Exposures an API process holds while the shop database cannot take them; beyond, new ones "
        "are dropped, counted and logged (a request never waits for the database)",
    )
    rules_refresh_seconds: float = Field(
        default=30, gt=0, le=60,
        description="How often the API re-reads the merchandising rules and the catalogue's inactive products "
        "(a rule change shows in served lists within this time)",
    )
    negative_feedback_ttl_seconds: int = Field(
        default=30 * 86400, ge=1,
        description="How long the API keeps a user's negative feedback in Redis, filtering every list served, "
        "after the user's last event: the versions published meanwhile exclude it themselves",
    )
