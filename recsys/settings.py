"""Where things live: database, Redis, artifacts. Read from ``RECSYS_*`` environment variables.

Secrets (passwords inside URLs, object store credentials) come only from the environment or from
Airflow connections, which the DAG resolves and passes in; nothing here has a default that embeds
a password.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
# written by `recsys services start`; real environment variables always win over it
LOCAL_SERVICES_ENV = REPO_ROOT / ".recsys" / "services.env"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_", env_file=LOCAL_SERVICES_ENV, extra="ignore")

    database_url: str | None = Field(
        default=None, description="Shop database, e.g. postgresql://user:pw@host:5432/shop"
    )
    db_schema: str = Field(default="public", description="Schema that holds the shop tables")
    redis_url: str | None = Field(default=None, description="Cache Redis, e.g. redis://host:6379/0")
    redis_prefix: str = Field(default="recsys", description="Prefix of every Redis key we write")
    artifacts_dir: Path = Field(
        default=REPO_ROOT / "artifacts",
        description="Local artifacts; with artifacts_url set, this worker's cache of the shared store",
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
    sql_dir: Path = Field(default=REPO_ROOT / "sql")
    previous_version_ttl_seconds: int = Field(
        default=24 * 3600, description="How long the replaced version stays readable"
    )

    @cached_property
    def require_database_url(self) -> str:
        if not self.database_url:
            raise RuntimeError(
                "No database configured: set RECSYS_DATABASE_URL "
                "(or run `recsys services start` for embedded local servers)"
            )
        return self.database_url

    @cached_property
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
    api_max_clock_skew_seconds: float = Field(
        default=300, ge=0, description="How far in the future an event's timestamp may be"
    )
    api_refresh_retry_seconds: float = Field(
        default=5, gt=0, description="How often lists left stale while Redis was down are retried"
    )
