"""Airflow UI page "Browse > Recommendations": look up the live recommendations of a user id (or
the top buys a user without a list gets), top buys by category, the live model's data window,
metrics and params, and the run history's quality chart, served by the api-server at
``<airflow>/recsys/``; and the runs' evaluation reports at ``<airflow>/recsys/reports/<dag run id>``,
which the evaluate task's extra link opens.

The app itself is ``recsys.serving.lookup`` (plain FastAPI). This file adds what only Airflow knows:
Redis and the shop database from the ``recsys_redis`` / ``recsys_db`` connections (else
``RECSYS_REDIS_URL`` / ``RECSYS_DATABASE_URL``, like the DAG) and Airflow's own login check: plugin
apps are not protected by Airflow auth unless they ask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.plugins_manager import AirflowPlugin
from starlette.types import ASGIApp, Receive, Scope, Send

from recsys.serving.links import MOUNT_PREFIX

if TYPE_CHECKING:
    from recsys.core.settings import Settings


def _settings() -> Settings:
    """Settings as the DAG resolves them: Redis (the live version) and the shop database (product
    names, run history); the page works without the database, showing ids only."""
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection

    from recsys.core.settings import Settings

    overrides = {}
    for field, conn_id in (("database_url", "recsys_db"), ("redis_url", "recsys_redis")):
        try:
            # the server-side lookup (env backend, secrets backends, then the metadata DB);
            # the DAG's airflow.sdk.Connection.get is the task-side one
            overrides[field] = Connection.get_connection_from_secrets(conn_id).get_uri()
        except AirflowNotFoundException:
            pass
    return Settings(**overrides)


def _build_app() -> ASGIApp:
    from airflow.api_fastapi.auth.managers.models.resource_details import AccessView
    from airflow.api_fastapi.core_api.security import requires_access_view
    from fastapi import Depends

    from recsys.serving.lookup import create_app

    # any user allowed to use the Airflow UI; the JWT comes from the UI's session cookie
    # (the page is same-origin) or from an Authorization: Bearer header
    return create_app(_settings, dependencies=[Depends(requires_access_view(AccessView.WEBSITE))])


class LazyLookupApp:
    """Builds the lookup app on its first request.

    Every Airflow process imports plugin files (each task runner too, for macros), but only the
    api-server serves this app: the others skip importing Airflow's API security and recsys.
    """

    def __init__(self) -> None:
        self._app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None:
            self._app = _build_app()
        await self._app(scope, receive, send)


class RecsysPlugin(AirflowPlugin):
    name = "recsys"
    fastapi_apps = [{"app": LazyLookupApp(), "url_prefix": MOUNT_PREFIX, "name": "Recsys"}]
    external_views = [
        {
            "name": "Recommendations",
            # relative, so it resolves against the UI's <base href> and works under a base_url path
            "href": MOUNT_PREFIX.lstrip("/") + "/",
            "destination": "nav",
            "category": "browse",
            # the UI shows the page at <airflow>/plugin/recsys
            "url_route": "recsys",
        }
    ]
