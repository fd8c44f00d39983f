"""One publish task of ``recsys_daily`` in a process of its own, as an Airflow worker on another
machine runs it: ``python tests/publish_step.py prepare|shard|finish INPUT`` with the task's XCom input
as JSON, its return value as JSON on stdout. Settings come from the DAG's own
``recsys_settings()`` (so from RECSYS_* variables), the run from the XCom through ``planned``,
exactly as in the task bodies of dags/recsys_dags.py."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dags"))

import recsys_dags  # noqa: E402 - the DAG file, found through the path above

from recsys.pipeline.publish.stage import ShardResult  # noqa: E402
from recsys.pipeline.stages import finish_publish_stage, prepare_publish_stage, publish_shard_stage  # noqa: E402


def prepare(run: dict) -> list[dict]:
    settings = recsys_dags.recsys_settings()
    _, attempt = prepare_publish_stage(settings, recsys_dags.planned(run, settings))
    return [{"run": run, "attempt": attempt, "shard": shard} for shard in range(run["shards"])]


def shard(job: dict) -> dict:
    run, settings = job["run"], recsys_dags.recsys_settings()
    result = publish_shard_stage(settings, recsys_dags.planned(run, settings), job["attempt"], job["shard"], run["shards"])
    return asdict(result)


def finish(job: dict) -> dict:
    run, settings = job["run"], recsys_dags.recsys_settings()
    results = [ShardResult(**values) for values in job["shard_results"]]
    result = finish_publish_stage(settings, recsys_dags.planned(run, settings), results[0].attempt, results, run["shards"])
    return {"version": result.version, "users": result.users}


if __name__ == "__main__":
    step = {"prepare": prepare, "shard": shard, "finish": finish}[sys.argv[1]]
    print(json.dumps(step(json.loads(sys.argv[2]))))
