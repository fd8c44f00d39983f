"""``recsys`` command: every stage and the whole pipeline without Airflow."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from recsys import storage
from recsys.bench.cart import cart_command
from recsys.bench.chaos import chaos_command
from recsys.bench.negative import negative_command
from recsys.bench.quality import bench_app
from recsys.bench.serve import serve_bench_command
from recsys.bench.serve_cpu import serve_cpu_command
from recsys.bench.speed import speed_bench_command
from recsys.core import db
from recsys.core.errors import RecsysError, describe
from recsys.core.params import PipelineParams
from recsys.core.redact import mask_url
from recsys.core.settings import Settings
from recsys.local import services
from recsys.pipeline import stages
from recsys.pipeline.stages import plan_run, run_pipeline
from recsys.storage import reads, versions

app = typer.Typer(
    help="Batch recommender: Postgres -> implicit ALS -> Redis.", no_args_is_help=True, pretty_exceptions_enable=False
)
services_app = typer.Typer(help="Embedded local PostgreSQL and Redis (for machines without them).")
app.add_typer(services_app, name="services")
rules_app = typer.Typer(
    help="Merchandising rules (pin, boost, bury, exclude) on top of the model; docs/rules.md.", no_args_is_help=True
)
app.add_typer(rules_app, name="rules")
app.add_typer(bench_app, name="bench")
app.command("chaos")(chaos_command)
bench_app.command("serve")(serve_bench_command)
bench_app.command("serve-cpu")(serve_cpu_command)
bench_app.command("speed")(speed_bench_command)
bench_app.command("negative")(negative_command)
bench_app.command("cart")(cart_command)
console = Console()
err_console = Console(stderr=True)

EndOption = Annotated[
    datetime | None,
    typer.Option("--end", help="Data window end (exclusive), ISO 8601; UTC if no offset. Default: now."),
]
ParamOption = Annotated[
    list[str] | None,
    typer.Option("--param", "-p", help="Override a parameter: NAME=VALUE (VALUE as JSON), repeatable."),
]


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _configured_urls() -> tuple[str | None, str | None]:
    try:
        settings = Settings()
    except Exception:  # noqa: BLE001 - the settings themselves may be what failed
        return None, None
    return settings.database_url, settings.redis_url


def main() -> None:
    """The ``recsys`` command: errors as one line, the traceback only with ``--debug``."""
    try:
        app()
    except Exception as error:
        if "--debug" in sys.argv[1:]:
            raise
        err_console.print(f"[red]error:[/red] {describe(error, *_configured_urls())}", soft_wrap=True, highlight=False)
        sys.exit(1)


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
    err_console.print(f"[red]error:[/red] {error}", soft_wrap=True, highlight=False)
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


@services_app.command("airflow-db")
def services_airflow_db(
    env_file: Annotated[Path, typer.Option(help="where the Airflow settings go, for `make airflow`")] = Path(
        ".airflow/metadata-db.env"
    ),
) -> None:
    """Give Airflow's metadata a database ("airflow") on the shop's PostgreSQL server (the embedded
    one by default), and write the settings that point Airflow at it to ENV_FILE."""
    url = services.write_airflow_env(Settings(), env_file)
    console.print(f"Airflow metadata database: {mask_url(url)} (settings in {env_file})")


@app.command("init-db")
def init_db() -> None:
    """Create the shop tables (interactions, products) and the quality history (recsys_runs) in
    the configured schema."""
    settings = Settings()
    db.create_schema(settings)
    console.print(f"tables ready in schema {settings.db_schema}")


@app.command("demo-data")
def demo_data(
    users: int = 2_000,
    products: int = 500,
    days: int = 120,
    seed: int = 42,
    interactions: Annotated[int | None, typer.Option(help="Aim at this many events (else about 34 per user).")] = None,
    end: EndOption = None,
) -> None:
    """Replace the shop tables with a generated demo shop (loaded with COPY)."""
    from recsys.local.demo import DemoShop, load_demo

    shop = DemoShop(users=users, products=products, days=days, seed=seed, interactions=interactions)
    result = load_demo(Settings(), shop, _end(end), progress=True)
    console.print(
        f"loaded {result.interactions:,} interactions and {result.products:,} products "
        f"from {result.start.isoformat()} to {result.end.isoformat()}"
    )


UseTunedOption = Annotated[
    bool, typer.Option("--use-tuned/--no-use-tuned", help="Params left at defaults take the tuned values.")
]


def _stage(name: str, end: datetime | None, overrides: list[str] | None, use_tuned: bool = True) -> None:
    settings = Settings()
    try:
        run = plan_run(settings, _end(end), _params(overrides), use_tuned)
        if name == "extract":
            result = stages.extract_stage(settings, run, progress=True)
        elif name == "matrix":
            result = stages.matrix_stage(settings, run)
        elif name == "train":
            result = stages.train_stage(settings, run, progress=True)
        elif name == "evaluate":
            result = stages.evaluate_stage(settings, run)
        else:
            result = stages.publish_stage(settings, run, progress=True)
    except (RecsysError, FileNotFoundError) as error:
        raise _fail(error) from error
    console.print(result)


@app.command("extract")
def extract_command(end: EndOption = None, param: ParamOption = None, use_tuned: UseTunedOption = True) -> None:
    """Extract one window of interactions (COPY) into validated Parquet."""
    _stage("extract", end, param, use_tuned)


@app.command("matrix")
def matrix_command(end: EndOption = None, param: ParamOption = None, use_tuned: UseTunedOption = True) -> None:
    """Build id maps and the weighted CSR matrices from the extract."""
    _stage("matrix", end, param, use_tuned)


@app.command("train")
def train_command(end: EndOption = None, param: ParamOption = None, use_tuned: UseTunedOption = True) -> None:
    """Train ALS (holdout and full models)."""
    _stage("train", end, param, use_tuned)


@app.command("evaluate")
def evaluate_command(end: EndOption = None, param: ParamOption = None, use_tuned: UseTunedOption = True) -> None:
    """Evaluate against popularity on the holdout; exit 1 if the quality gate refuses."""
    _stage("evaluate", end, param, use_tuned)


@app.command("publish")
def publish_command(end: EndOption = None, param: ParamOption = None, use_tuned: UseTunedOption = True) -> None:
    """Publish to Redis under a new version and switch it live atomically."""
    _stage("publish", end, param, use_tuned)


@app.command("run")
def run_command(end: EndOption = None, param: ParamOption = None, use_tuned: UseTunedOption = True) -> None:
    """Run the whole pipeline: extract, matrix, train, evaluate (gate), publish."""
    try:
        result = run_pipeline(Settings(), _end(end), _params(param), use_tuned, progress=True)
    except RecsysError as error:
        raise _fail(error) from error
    console.print(f"[green]{result.evaluation.reason}[/green]")
    console.print(f"published version {result.publish.version} for {result.publish.users:,} users")


@app.command("tune")
def tune_command(
    end: EndOption = None,
    trials: Annotated[int, typer.Option(help="Search budget: number of ALS fits.")] = 40,
    lookback_days: int = PipelineParams().lookback_days,
    holdout_days: int = PipelineParams().holdout_days,
) -> None:
    """Tune ALS on the shop's recent data (time-based validation); later runs use the result."""
    from recsys.pipeline.tune import tuned_path

    settings = Settings()
    search = PipelineParams(lookback_days=lookback_days, holdout_days=holdout_days, confidence_scaling="none")
    try:
        run = plan_run(settings, _end(end), search, use_tuned=False)
        stages.extract_stage(settings, run, progress=True)
        stages.matrix_stage(settings, run)
        tuned = stages.tune_stage(settings, run, trials)
    except RecsysError as error:
        raise _fail(error) from error
    where = tuned_path(settings) if run.store is None else run.store.url(stages.TUNED)
    console.print(f"chosen {tuned.params} in {tuned.seconds:.1f} s ({tuned.trials} trials) -> {where}")
    console.print(f"result {tuned.result_id} {tuned.decision}")
    console.print(f"validation MAP@{search.k}: chosen {tuned.validation['chosen']['map']:.4f}, "
                  f"starting params {tuned.validation['starting_params']['map']:.4f}")


@app.command("show")
def show(
    user: Annotated[list[str] | None, typer.Option(help="User id to show (repeatable).")] = None,
    users: Annotated[int, typer.Option(help="Show this many users if --user is not given.")] = 3,
) -> None:
    """Print live recommendations, top buys and model metrics read back from Redis."""
    settings = Settings()
    live = reads.live_build(*storage.connect(settings))
    meta = None if live is None else live.meta()
    if meta is None:
        hint = stages.recovery_hint(settings) or "run the pipeline first"
        raise _fail(RecsysError(f"no live version under prefix {settings.redis_prefix!r}; {hint}"))
    console.print(f"live version [bold]{meta['version']}[/bold], data {meta['data_start']} .. {meta['data_end']}")
    metrics = Table("", "MAP@K", "nDCG@K", "P@K", "R@K", "coverage", title=f"holdout, K={meta['metrics']['model']['k']}")
    for name in ("model", "popularity"):
        m = meta["metrics"][name]
        metrics.add_row(name, *(f"{m[key]:.4f}" for key in ("map", "ndcg", "precision", "recall", "coverage")))
    console.print(metrics)
    user_ids = user or [owner for owner, _ in islice(live.entries("user_recs"), users)]
    for user_id in user_ids:
        key = live.keys.user_recs(live.name, user_id)
        console.print(f"HGET {key} {user_id} -> {json.dumps(live.user_recommendations(user_id))}", soft_wrap=True)
    console.print(f"HGET {live.keys.top_buys(live.name)} all -> {json.dumps(live.top_buys())}", soft_wrap=True)
    _show_tuned(settings)


def _show_tuned(settings: Settings) -> None:
    """The active tuned params and where they come from (runs use them for params left at defaults)."""
    from recsys.core.layout import configured_store

    tuned = stages.tuned_params(settings, configured_store(settings))
    if tuned is None:
        console.print("tuned params: none active (runs use the defaults; `recsys tune` or the recsys_tune DAG makes some)")
        return
    console.print(f"tuned params (active): {json.dumps(tuned.params)}", soft_wrap=True)
    console.print(
        f"  result {tuned.result_id or '(unnamed)'} tuned at {tuned.tuned_at} on {tuned.window['start']} .. "
        f"{tuned.window['end']} ({tuned.trials} trials, started from {tuned.started_from}); validation MAP@K "
        f"{tuned.map:.4f}; {tuned.decision or 'activated'}", soft_wrap=True,
    )


@app.command("history")
def history_command(
    limit: Annotated[int, typer.Option(min=1, help="How many runs, newest first.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line, every column.")] = False,
) -> None:
    """The quality history: every evaluated run, its metrics, the gate's decision and what publish did."""
    from recsys.pipeline import history

    rows = history.recent_runs(Settings(), limit)
    if as_json:
        for row in rows:
            typer.echo(history.as_json(row))
        return
    table = Table("recorded at", "window end", "status", "model MAP@K", "popularity MAP@K", "version",
                  "interactions", "train s", "run")
    for row in rows:
        model, popularity = row["metrics"]["model"], row["metrics"]["popularity"]
        table.add_row(
            f"{row['recorded_at']:%Y-%m-%d %H:%M:%S}", f"{row['window_end']:%Y-%m-%d %H:%M}", row["status"],
            f"{model['map']:.4f} @{model['k']}", f"{popularity['map']:.4f}", row["published_version"] or "",
            f"{row['interactions']:,}" if row["interactions"] is not None else "",
            f"{row['train_seconds']:.1f}" if row["train_seconds"] is not None else "", row["run_key"],
        )
    console.print(table)
    if not rows:
        console.print("no run recorded yet: `recsys run` or the recsys_daily DAG records one at its evaluate stage")


@app.command("serve")
def serve_command(
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Processes; about one per core")] = 1,
    access_log: Annotated[bool, typer.Option(help="Log every request (costs throughput)")] = False,
) -> None:
    """Serve the recommendation API (uvicorn) on the live version in Redis.

    Needs API keys (RECSYS_API_KEYS or RECSYS_API_KEYS_FILE, docs/security.md) unless reads are
    public (RECSYS_API_PUBLIC_READS=true); refuses to start with keys it cannot use."""
    from recsys.serving.api import serve

    settings = Settings()
    serve(settings, host, port, workers, access_log, stages.recovery_hint(settings))


@app.command("api-key")
def api_key_command(
    scope: Annotated[str, typer.Option(help="read: GET endpoints only; write: also POST events")] = "write",
) -> None:
    """Print a new random API key as a RECSYS_API_KEYS entry (scope:key). Nothing is stored."""
    from recsys.serving.security import ApiKeyConfigError, new_api_key

    try:
        typer.echo(new_api_key(scope))  # type: ignore[arg-type]
    except ApiKeyConfigError as error:
        raise typer.BadParameter(str(error), param_hint="--scope") from None


@app.command("versions")
def versions_command(as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False) -> None:
    """List the live version and the kept (replaced) ones, newest first."""
    settings = Settings()
    found = versions.versions(*storage.connect(settings))
    if as_json:
        for info in found:
            typer.echo(json.dumps(info.__dict__))
        return
    if not found:
        hint = stages.recovery_hint(settings)
        raise _fail(RecsysError(f"no version under prefix {settings.redis_prefix!r}" + (f"; {hint}" if hint else "")))
    headers = ("role", "version", "data end", "published at", "users", "expires in", "complete")
    rows = [
        (info.role, info.version, info.data_end or "?", info.published_at or "?", str(info.counts.get("users")),
         "never" if info.ttl_seconds < 0 else f"{info.ttl_seconds / 3600:.1f} h", "yes" if info.complete else "NO")
        for info in found
    ]
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    if sum(widths) + 3 * len(widths) + 1 <= console.width:
        table = Table(*headers)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    # too narrow for the table: one block per version, so no version name or date is ever cut
    for row in rows:
        console.print(f"{row[0]} {row[1]}", highlight=False, soft_wrap=True)
        for name, value in zip(headers[2:], row[2:], strict=True):
            console.print(f"  {name}: {value}", highlight=False, soft_wrap=True)


@app.command("rollback")
def rollback_command(
    version: Annotated[str | None, typer.Option(help="Kept version to make live (default: the newest kept).")] = None,
) -> None:
    """Make a kept version live again, atomically; the version it replaces is kept in its place."""
    settings = Settings()
    try:
        chosen = versions.rollback(
            *storage.connect(settings), settings.previous_version_ttl_seconds, version,
            settings.publish_lock_ttl_seconds, settings.publish_lock_wait_seconds,
        )
    except RecsysError as error:
        raise _fail(error) from error
    console.print(f"version {chosen} is live again")


@app.command("republish")
def republish_command(
    end: Annotated[datetime | None, typer.Option("--end", help="Window end of the run (default: the run published last).")] = None,
) -> None:
    """Publish a finished run again from its artifacts, without extracting or training: the way
    back after the cache Redis lost its data."""
    try:
        result = stages.republish(Settings(), None if end is None else _end(end), progress=True)
    except RecsysError as error:
        raise _fail(error) from error
    console.print(f"published version {result.version} for {result.users:,} users")




@rules_app.command("add")
def rules_add(
    kind: Annotated[str, typer.Argument(help="pin | boost | bury | exclude")],
    product: Annotated[str | None, typer.Option(help="Target: one product id.")] = None,
    category: Annotated[str | None, typer.Option(help="Target: every product of this category.")] = None,
    attribute: Annotated[
        str | None, typer.Option(help="Target (exclude only): products whose attributes hold NAME=VALUE, e.g. in_stock=false.")
    ] = None,
    rank: Annotated[int | None, typer.Option(help="pin: the 1-based rank.")] = None,
    factor: Annotated[float | None, typer.Option(help="boost: > 1, bury: in (0, 1); multiplies the score.")] = None,
    in_category: Annotated[
        str | None, typer.Option("--in-category", help="pin: in this category's lists (?category=) instead of the main list.")
    ] = None,
    segment: Annotated[str | None, typer.Option(help="Only for users in this segment (user_segments table).")] = None,
    valid_from: Annotated[datetime | None, typer.Option("--from", help="In force from (ISO 8601; UTC if no offset).")] = None,
    valid_until: Annotated[datetime | None, typer.Option("--until", help="In force until, exclusive.")] = None,
    note: Annotated[str | None, typer.Option(help="Why, for whoever reads the rule later.")] = None,
) -> None:
    """Add a rule; it is checked against the catalogue and in served lists within
    RECSYS_RULES_REFRESH_SECONDS (30 s), in published lists from the next publish."""
    from recsys.core import rules

    name, value = rules.parse_attribute(attribute) if attribute is not None else (None, None)
    rule = rules.Rule(
        kind=kind, product_id=product, category=category, attribute=name, attribute_value=value,  # type: ignore[arg-type]
        scope_category=in_category, segment=segment, rank=rank, factor=factor, valid_from=valid_from,
        valid_until=valid_until, note=note,
    )
    added = rules.add_rule(Settings(), rule)
    console.print(f"rule {added.rule_id} added: {added.describe()}", highlight=False)


@rules_app.command("list")
def rules_list(as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False) -> None:
    """Every rule, with whether it is in force, scheduled or expired now."""
    from recsys.core import rules

    found, now = rules.list_rules(Settings()), datetime.now(UTC)
    if as_json:
        for rule in found:
            typer.echo(json.dumps({**rule.to_dict(), "status": rules.rule_status(rule, now)}))
        return
    table = Table("id", "rule", "status", "from", "until", "note")
    for rule in found:
        table.add_row(
            str(rule.rule_id), rule.describe(), rules.rule_status(rule, now),
            "" if rule.valid_from is None else f"{rule.valid_from:%Y-%m-%d %H:%M}",
            "" if rule.valid_until is None else f"{rule.valid_until:%Y-%m-%d %H:%M}", rule.note or "",
        )
    console.print(table)
    if not found:
        console.print("no rule yet: `recsys rules add --help`")


@rules_app.command("remove")
def rules_remove(rule_id: Annotated[int, typer.Argument(help="The rule's id (recsys rules list).")]) -> None:
    """Remove a rule; served lists drop it within RECSYS_RULES_REFRESH_SECONDS."""
    from recsys.core import rules

    if not rules.remove_rule(Settings(), rule_id):
        raise _fail(RecsysError(f"no rule with id {rule_id}"))
    console.print(f"rule {rule_id} removed")
