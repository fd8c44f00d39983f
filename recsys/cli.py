"""``recsys`` command: every stage and the whole pipeline without Airflow."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from recsys import db, services, store
from recsys.bench import bench_app
from recsys.errors import RecsysError
from recsys.params import PipelineParams
from recsys.pipeline import run_paths, run_pipeline, window_ending
from recsys.settings import Settings

app = typer.Typer(help="Batch recommender: Postgres -> implicit ALS -> Redis.", no_args_is_help=True)
services_app = typer.Typer(help="Embedded local PostgreSQL and Redis (for machines without them).")
app.add_typer(services_app, name="services")
app.add_typer(bench_app, name="bench")
console = Console()

EndOption = Annotated[
    datetime | None,
    typer.Option("--end", help="Data window end (exclusive), ISO 8601; UTC if no offset. Default: now."),
]
ParamOption = Annotated[
    list[str] | None,
    typer.Option("--param", "-p", help="Override a parameter: NAME=VALUE (VALUE as JSON), repeatable."),
]


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _params(overrides: list[str] | None) -> PipelineParams:
    values = {}
    for item in overrides or []:
        name, sep, raw = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--param {item!r} is not NAME=VALUE")
        try:
            values[name] = json.loads(raw)
        except json.JSONDecodeError:
            values[name] = raw
    return PipelineParams.from_dict(values)


def _end(end: datetime | None) -> datetime:
    if end is None:
        return datetime.now(UTC).replace(microsecond=0)
    return end if end.tzinfo else end.replace(tzinfo=UTC)


def _fail(error: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {error}")
    return typer.Exit(code=1)


@services_app.command("start")
def services_start() -> None:
    """Start (or reuse) embedded PostgreSQL and Redis; their URLs go to .recsys/services.env."""
    local = services.start()
    for name, value in local.env().items():
        typer.echo(f"{name}={value}")


@services_app.command("stop")
def services_stop() -> None:
    services.stop()
    console.print("embedded services stopped")


@app.command("init-db")
def init_db() -> None:
    """Create the shop tables (interactions, products) in the configured schema."""
    settings = Settings()
    db.create_schema(settings)
    console.print(f"tables ready in schema {settings.db_schema}")


@app.command("demo-data")
def demo_data(
    users: int = 2_000, products: int = 500, days: int = 120, seed: int = 42, end: EndOption = None
) -> None:
    """Replace the shop tables with a generated demo shop (loaded with COPY)."""
    from recsys.demo import DemoShop, load_demo

    result = load_demo(Settings(), DemoShop(users=users, products=products, days=days, seed=seed), _end(end), progress=True)
    console.print(
        f"loaded {result.interactions:,} interactions and {result.products:,} products "
        f"from {result.start.isoformat()} to {result.end.isoformat()}"
    )


def _stage(name: str, end: datetime | None, overrides: list[str] | None) -> None:
    from recsys import evaluate, extract, matrix, publish, train

    settings, params = Settings(), _params(overrides)
    window = window_ending(_end(end), params)
    paths = run_paths(settings, window, params)
    try:
        if name == "extract":
            result = extract.extract(settings, window, paths.extract, params, progress=True)
        elif name == "matrix":
            ex = paths.extract
            result = matrix.build_matrix(ex / "interactions.parquet", ex / "products.parquet", window, paths.matrix, params)
        elif name == "train":
            result = train.train(paths.matrix, paths.model, params, progress=True)
        elif name == "evaluate":
            result = evaluate.evaluate(paths.matrix, paths.model, paths.evaluation, params)
            evaluate.enforce_quality_gate(result)
        else:
            result = publish.publish(settings, paths.matrix, paths.model, paths.evaluation / "report.json", params, progress=True)
    except (RecsysError, FileNotFoundError) as error:
        raise _fail(error) from error
    console.print(result)


@app.command("extract")
def extract_command(end: EndOption = None, param: ParamOption = None) -> None:
    """Extract one window of interactions (COPY) into validated Parquet."""
    _stage("extract", end, param)


@app.command("matrix")
def matrix_command(end: EndOption = None, param: ParamOption = None) -> None:
    """Build id maps and the weighted CSR matrices from the extract."""
    _stage("matrix", end, param)


@app.command("train")
def train_command(end: EndOption = None, param: ParamOption = None) -> None:
    """Train ALS (holdout and full models)."""
    _stage("train", end, param)


@app.command("evaluate")
def evaluate_command(end: EndOption = None, param: ParamOption = None) -> None:
    """Evaluate against popularity on the holdout; exit 1 if the quality gate refuses."""
    _stage("evaluate", end, param)


@app.command("publish")
def publish_command(end: EndOption = None, param: ParamOption = None) -> None:
    """Publish to Redis under a new version and switch it live atomically."""
    _stage("publish", end, param)


@app.command("run")
def run_command(end: EndOption = None, param: ParamOption = None) -> None:
    """Run the whole pipeline: extract, matrix, train, evaluate (gate), publish."""
    try:
        result = run_pipeline(Settings(), _end(end), _params(param), progress=True)
    except RecsysError as error:
        raise _fail(error) from error
    console.print(f"[green]{result.evaluation.reason}[/green]")
    console.print(f"published version {result.publish.version} for {result.publish.users:,} users")


@app.command("show")
def show(
    user: Annotated[list[str] | None, typer.Option(help="User id to show (repeatable).")] = None,
    users: Annotated[int, typer.Option(help="Show this many users if --user is not given.")] = 3,
) -> None:
    """Print live recommendations, top buys and model metrics read back from Redis."""
    settings = Settings()
    client, keys = store.redis_client(settings), store.layout(settings)
    meta = store.live_meta(client, keys)
    if meta is None:
        raise _fail(RecsysError(f"no live version under prefix {settings.redis_prefix!r}; run the pipeline first"))
    console.print(f"live version [bold]{meta['version']}[/bold], data {meta['data_start']} .. {meta['data_end']}")
    metrics = Table("", "MAP@K", "nDCG@K", "P@K", "R@K", "coverage", title=f"holdout, K={meta['metrics']['model']['k']}")
    for name in ("model", "popularity"):
        m = meta["metrics"][name]
        metrics.add_row(name, *(f"{m[key]:.4f}" for key in ("map", "ndcg", "precision", "recall", "coverage")))
    console.print(metrics)
    user_ids = user or [field for field, _ in zip(client.hscan_iter(keys.live("user_recs")), range(users))]
    for user_id in user_ids:
        user_id = user_id[0] if isinstance(user_id, tuple) else user_id
        found = store.user_recommendations(client, keys, user_id)
        console.print(f"HGET {keys.live('user_recs')} {user_id} -> {json.dumps(found)}", soft_wrap=True)
    console.print(f"HGET {keys.live('top_buys')} all -> {json.dumps(store.top_buys(client, keys))}", soft_wrap=True)
