"""Where the look-up app's pages are, for the places that link to them: the Airflow plugin mounts
the app at ``MOUNT_PREFIX`` and the DAG's evaluate task links to its run's report. Nothing heavy is
imported here, so a DAG file can use it without loading the app."""

from __future__ import annotations

from urllib.parse import quote

# where the Airflow api-server mounts the look-up app (plugins/recsys_plugin.py)
MOUNT_PREFIX = "/recsys"
# inside the app: /reports/<dag run id> is the evaluation report of that run of recsys_daily
RUN_REPORTS = "/reports"


def run_report_path(dag_run_id: str) -> str:
    """The path, inside the app, of the report an Airflow run of recsys_daily wrote."""
    return f"{RUN_REPORTS}/{quote(dag_run_id, safe='')}"


def airflow_run_report_link(dag_run_id: str) -> str:
    """The same report as a link relative to the Airflow UI's base URL (its ``<base href>``), so it
    holds under any ``[api] base_url`` path, as the plugin's menu entry does."""
    return MOUNT_PREFIX.lstrip("/") + run_report_path(dag_run_id)
