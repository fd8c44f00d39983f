"""The ``recsys`` command end to end, the demo generator, and the embedded servers."""

from __future__ import annotations

import json
import shutil
import uuid

import numpy as np
import psycopg
import pytest
import redis
from helpers import services_dir
from psycopg import sql as pgsql
from typer.testing import CliRunner

from recsys import cli
from recsys.cli import app
from recsys.local import services
from recsys.local.demo import DemoShop, generate_interactions

runner = CliRunner()


def test_stage_commands_then_show(recsys_env, window_end, monkeypatch):
    end = ["--end", window_end.isoformat()]
    loaded = runner.invoke(app, ["demo-data", "--users", "400", "--products", "120", "--days", "60", *end])
    assert loaded.exit_code == 0, loaded.output
    for stage in ("extract", "matrix", "train", "evaluate", "publish"):
        result = runner.invoke(app, [stage, *end, "--param", "factors=16"])
        assert result.exit_code == 0, f"{stage}: {result.output}"
    shown = runner.invoke(app, ["show", "--users", "2"])
    assert shown.exit_code == 0, shown.output
    assert shown.output.count("recommended_products") == 2
    assert "top_buys" in shown.output
    assert "tuned params: none active" in shown.output

    history = runner.invoke(app, ["history", "--json"])
    assert history.exit_code == 0, history.output
    (row,) = [json.loads(line) for line in history.output.splitlines()]
    assert row["status"] == "published" and row["published_version"] in shown.output
    assert row["params"]["factors"] == 16 and row["window_end"] == window_end.isoformat()
    monkeypatch.setattr(cli.console, "width", 250)  # the table's columns unabridged
    table = runner.invoke(app, ["history"])
    assert table.exit_code == 0 and "published" in table.output and row["run_key"] in table.output


def test_run_command_reports_gate_refusal_and_bad_params(recsys_env, window_end):
    end = ["--end", window_end.isoformat()]
    runner.invoke(app, ["demo-data", "--users", "400", "--products", "120", "--days", "60", *end])
    refused = runner.invoke(app, ["run", *end, "--param", "min_lift=50"])
    assert refused.exit_code == 1
    assert "quality gate refused" in refused.output
    bad = runner.invoke(app, ["run", *end, "--param", "factors=0"])
    assert bad.exit_code != 0
    assert "factors must be >= 1" in str(bad.exception) + bad.output


def test_empty_window_is_a_clear_cli_error(recsys_env, window_end):
    result = runner.invoke(app, ["extract", "--end", window_end.isoformat()])
    assert result.exit_code == 1
    assert "no interactions in" in result.output


def test_demo_generator_is_deterministic_and_shop_like(window_end):
    shop = DemoShop(users=500, products=200, days=30, seed=3)
    (catalogue, first), = list(generate_interactions(shop, window_end))
    (_, again), = list(generate_interactions(shop, window_end))
    assert first.equals(again)
    counts = first["event_type"].value_counts()
    assert counts["view"] > counts["add_to_cart"] > counts["purchase"] > 0
    assert first["occurred_at"].min() >= window_end - np.timedelta64(30, "D")
    assert first["occurred_at"].max() < window_end
    popularity = first.groupby("product_id").size().sort_values(ascending=False).to_numpy()
    top_share = popularity[: len(popularity) // 10].sum() / popularity.sum()
    assert top_share > 0.3  # power law: the top 10 % of products take a large share
    assert 0 < (~catalogue["active"]).sum() < len(catalogue) * 0.2


def test_embedded_servers_start_reuse_and_stop(tmp_path):
    env_file, data_dir = tmp_path / "services.env", services_dir()
    started = services.start(data_dir, env_file=env_file)
    try:
        assert services.start(data_dir, env_file=env_file) == started  # reused, not doubled
        with psycopg.connect(started.database_url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert redis.Redis.from_url(started.redis_url).ping()
        assert env_file.read_text().splitlines() == [f"{k}={v}" for k, v in started.env().items()]
    finally:
        services.stop(data_dir, env_file=env_file)
        shutil.rmtree(data_dir, ignore_errors=True)
    assert not env_file.exists()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(started.redis_url, socket_connect_timeout=1).ping()


def test_airflow_gets_a_metadata_database_of_its_own_on_the_shops_server(settings, tmp_path):
    """`make airflow`: Airflow's metadata in PostgreSQL, a database next to the shop's, created once;
    the settings file points both of Airflow's engines at it through psycopg 3 and only its owner
    can read it (the URL may carry a password)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"airflow_{uuid.uuid4().hex[:10]}"  # not "airflow": the test server may be shared
    env_file = tmp_path / "metadata-db.env"
    try:
        url = services.write_airflow_env(settings, env_file, name)
        assert services.airflow_database_url(settings, name) == url  # there already: reused
        assert (make_url(url).drivername, make_url(url).database) == ("postgresql+psycopg", name)
        engine = create_engine(url)  # what Airflow's engine does with it
        with engine.connect() as conn:
            assert conn.execute(text("SELECT current_database()")).scalar() == name
        engine.dispose()
        assert env_file.stat().st_mode & 0o077 == 0
        assert env_file.read_text().splitlines() == [
            f"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN='{url}'",
            f"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC='{url}'",
        ]
    finally:
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute(pgsql.SQL("DROP DATABASE IF EXISTS {}").format(pgsql.Identifier(name)))


def test_params_reject_unknown_and_invalid_values():
    from recsys.core.errors import InputError
    from recsys.core.params import PipelineParams

    with pytest.raises(InputError, match="unknown parameters: factor"):
        PipelineParams.from_dict({"factor": 3})
    with pytest.raises(InputError, match=r"holdout_days.*event_weights\['view'\]"):
        PipelineParams(holdout_days=90, lookback_days=90, event_weights={"view": -1})
    round_tripped = PipelineParams.from_dict(json.loads(json.dumps(PipelineParams().to_dict())))
    assert round_tripped == PipelineParams()
    assert round_tripped.fingerprint() == PipelineParams().fingerprint()
    assert PipelineParams(factors=32).fingerprint() != PipelineParams().fingerprint()


HEAVY_MODULES = ("fastapi", "implicit", "airflow", "numba", "pandas", "matplotlib", "pyarrow", "scipy", "redis")


def _loaded_after(statement: str, modules: tuple[str, ...]) -> list[str]:
    import subprocess
    import sys

    code = f"import sys; {statement}; print(' '.join(sorted(m for m in {modules!r} if m in sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.split()


def test_the_command_starts_without_heavy_libraries():
    """`recsys --help` (and every command's start, and every stage process the speed bench spawns:
    it imports the CLI again) stays light: those load where they are used."""
    assert _loaded_after("import recsys.cli", (*HEAVY_MODULES, "recsys.bench", "recsys.pipeline")) == []


def test_a_stage_loads_only_its_own_libraries():
    """Each stage runs in a process of its own (an Airflow task): planning a run and running the
    extract, matrix or train stage load no other stage's libraries."""
    plan = "import recsys.pipeline.stages"
    others = ("numba", "pandas", "matplotlib", "redis", "implicit", "scipy", "fsspec", "psycopg2", "recsys.pipeline.extract")
    assert _loaded_after(plan, others) == []
    extract = "from recsys.pipeline import extract, stages"
    # the tuning search's libraries (scipy) and the shared store's (fsspec, unless configured) too
    others = ("numba", "pandas", "matplotlib", "implicit", "scipy", "fsspec", "recsys.pipeline.publish")
    assert _loaded_after(extract, others) == []
    train = "from recsys.pipeline import stages, train"
    assert _loaded_after(train, ("numba", "pandas", "matplotlib", "redis", "recsys.pipeline.extract")) == []


def test_help_lists_every_command_and_loads_a_bench_module_only_when_asked():
    top = runner.invoke(app, ["--help"], terminal_width=200)
    assert top.exit_code == 0, top.output
    for command in ("chaos", "init-db", "demo-data", "extract", "matrix", "train", "evaluate", "publish", "run",
                    "tune", "show", "history", "serve", "api-key", "versions", "rollback", "republish", "services",
                    "rules", "bench"):
        assert f" {command} " in top.output, command
    bench = runner.invoke(app, ["bench", "--help"], terminal_width=200)
    assert bench.exit_code == 0, bench.output
    for command in ("quality", "defaults", "serve", "speed", "negative", "cart"):
        assert f" {command} " in bench.output, command
    speed = runner.invoke(app, ["bench", "speed", "--help"], terminal_width=200)
    assert speed.exit_code == 0 and "--spark-interactions" in speed.output
    unknown = runner.invoke(app, ["bench", "nonesuch"])
    assert unknown.exit_code != 0 and "nonesuch" in unknown.output
