"""The pipeline's run history table (``recsys_runs``, created by ``recsys init-db``) filled with
runs whose metrics are known, as the look-up page tests need it."""

from __future__ import annotations

from datetime import datetime, timedelta

from psycopg.types.json import Jsonb

from recsys.core import db
from recsys.core.settings import Settings

INSERT_RUN = """
INSERT INTO recsys_runs (run_key, dag_run_id, window_start, window_end, params, metrics, gate_passed,
    gate_reason, published_version, status, extract_counts, train_seconds, interactions, users, items,
    recorded_at)
VALUES (%(run_key)s, %(dag_run_id)s, %(window_start)s, %(window_end)s, %(params)s, %(metrics)s,
    %(gate_passed)s, %(gate_reason)s, %(published_version)s, %(status)s, %(extract_counts)s,
    %(train_seconds)s, %(interactions)s, %(users)s, %(items)s, %(recorded_at)s)
"""


def daily_runs(last_window_end: datetime, model_maps: list[float], popularity_maps: list[float]) -> list[dict]:
    """One daily run per MAP pair, oldest first, ending at ``last_window_end``; the gate refuses a
    run whose model MAP does not beat popularity."""
    runs = []
    for days_back, (model_map, popularity_map) in enumerate(zip(reversed(model_maps), reversed(popularity_maps), strict=True)):
        end = last_window_end - timedelta(days=days_back)
        passed = model_map > popularity_map
        runs.append(
            {
                "run_key": f"run-{end:%Y%m%d}",
                "dag_run_id": f"scheduled__{end.isoformat()}",
                "window_start": end - timedelta(days=90),
                "window_end": end,
                "params": Jsonb({"factors": 64}),
                "metrics": Jsonb(
                    {
                        "model": {"map": model_map, "ndcg": 0.2, "precision": 0.1, "recall": 0.1, "coverage": 0.5, "k": 10},
                        "popularity": {"map": popularity_map, "ndcg": 0.1, "precision": 0.05, "recall": 0.05, "coverage": 0.1, "k": 10},
                    }
                ),
                "gate_passed": passed,
                "gate_reason": ("passed: " if passed else "refused: ") + "model MAP@10 vs popularity MAP@10",
                "published_version": f"v-{end:%Y%m%d}" if passed else None,
                "status": "published" if passed else "refused",
                "extract_counts": Jsonb(
                    {"rows_read": 1010, "rows_kept": 1000, "rows_dropped": 10, "rows_invalid": 0, "dropped": {"unknown_event_type": 10}}
                ),
                "train_seconds": 1.5,
                "interactions": 1000,
                "users": 600,
                "items": 150,
                "recorded_at": end + timedelta(hours=1),
            }
        )
    return list(reversed(runs))


def backfilled_runs(last_window_end: datetime, live_version: str) -> list[dict]:
    """Twelve daily runs as a shop's history looks after a backfill, in recording order: the daily
    runs of the last nine days (one refused by a stricter gate, min_lift 0.5), then a backfill of the
    three days before them (recorded last, not published: the live data is newer). The last day's
    run is the live version."""
    model = [0.221, 0.226, 0.218, 0.232, 0.229, 0.204, 0.238, 0.235, 0.222, 0.241, 0.246, 0.249]
    popularity = [0.148, 0.150, 0.147, 0.151, 0.150, 0.152, 0.151, 0.153, 0.152, 0.151, 0.153, 0.154]
    runs = daily_runs(last_window_end, model, popularity)
    for run in runs:
        run["status"], run["gate_passed"] = "published", True
    refused = runs[8]  # three days before the end, with min_lift 0.5: 0.222 <= 0.152 x 1.5
    refused.update(status="refused", gate_passed=False, published_version=None, params=Jsonb({"factors": 64, "min_lift": 0.5}),
                   gate_reason="refused: model MAP@10 0.2220 vs popularity MAP@10 0.1520 (needs > 0.2280, min_lift=0.5)")
    backfill = runs[:3]
    for days_back, run in enumerate(reversed(backfill)):
        run.update(status="skipped_stale", published_version=None, dag_run_id=f"backfill__{run['window_end'].isoformat()}",
                   recorded_at=last_window_end + timedelta(hours=2, minutes=10 * (3 - days_back)))
    runs[-1]["published_version"] = live_version
    return runs[3:] + backfill


def write_runs(settings: Settings, runs: list[dict]) -> None:
    with db.connect(settings) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM recsys_runs")  # the runs a test published itself: the test's runs replace them
        cur.executemany(INSERT_RUN, runs)
