"""An example downstream DAG: runs after every publish of recsys_daily, scheduled on the live
asset (``recsys://<RECSYS_REDIS_PREFIX>/live``), and reads the published version and metrics from
the asset event's extra. It ships paused: replace the task with your own work (warm a CDN, e-mail
a merchandiser, refresh a dashboard) and unpause it, or delete this file."""

from __future__ import annotations

import logging
import os

import pendulum
from airflow.sdk import Asset, dag, task

LIVE_ASSET = Asset(f"recsys://{os.environ.get('RECSYS_REDIS_PREFIX', 'recsys')}/live")


@dag(
    dag_id="recsys_after_publish",
    schedule=[LIVE_ASSET],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    is_paused_upon_creation=True,
    tags=["recsys", "example"],
)
def recsys_after_publish():
    @task(inlets=[LIVE_ASSET])
    def announce(inlet_events=None) -> dict:
        events = inlet_events[LIVE_ASSET]
        published = events[-1].extra if events else {}
        logging.getLogger("recsys.dags.after_publish").info("recsys published %s", published)
        return {"version": published.get("version"), "model_map": published.get("metrics", {}).get("model_map")}

    announce()


recsys_after_publish()
