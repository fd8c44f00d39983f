"""``recsys`` command: every stage and the whole pipeline without Airflow.

Start-up imports only what the command line itself needs: each command imports its own modules
(the benchmarks' whole modules through ``_LazyGroup``), so ``recsys extract`` does not pay for
the benchmarks, the API or numba, and neither does each stage process ``recsys bench speed``
spawns (it imports this module again, as the program it runs)."""

from __future__ import annotations

import importlib
import json
import logging
import sys
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ClassVar

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup
from typer.main import get_command_from_info
from typer.models import CommandInfo

from recsys.core.errors import RecsysError, describe
from recsys.core.params import TUNE_REPEATS, PipelineParams

if TYPE_CHECKING:
    import click

    from recsys.core.settings import Settings


class _LazyGroup(TyperGroup):
    """A command group with commands that live in other modules, imported when the command is
    run or a help page lists it. ``lazy``: command name -> "module:function", in listing order,
    before the commands defined here."""

    lazy: ClassVar[dict[str, str]] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*self.lazy, *(name for name in super().list_commands(ctx) if name not in self.lazy)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            module, _, function = self.lazy[cmd_name].partition(":")
            callback = getattr(importlib.import_module(module), function)
            self.commands[cmd_name] = get_command_from_info(
                CommandInfo(name=cmd_name, callback=callback),
                pretty_exceptions_short=True,
                rich_markup_mode=self.rich_markup_mode,
            )
        return super().get_command(ctx, cmd_name)


def _lazy_group(commands: dict[str, str]) -> type[_LazyGroup]:
    return type("LazyGroup", (_LazyGroup,), {"lazy": commands})


app = typer.Typer(
    cls=_lazy_group({"chaos": "recsys.bench.chaos:chaos_command"}),
    help="Batch recommender: Postgres -> implicit ALS -> Redis.", no_args_is_help=True, pretty_exceptions_enable=False,
)
services_app = typer.Typer(help="Embedded local PostgreSQL and Redis (for machines without them).")
app.add_typer(services_app, name="services")
rules_app = typer.Typer(
    help="Merchandising rules (pin, boost, bury, exclude) on top of the model; docs/rules.md.", no_args_is_help=True
)
app.add_typer(rules_app, name="rules")
experiments_app = typer.Typer(
    help="A/B tests of recommendation variants (param overrides per share of users); docs/experiments.md.",
    no_args_is_help=True,
)
app.add_typer(experiments_app, name="experiments")
bench_app = typer.Typer(
    cls=_lazy_group({
        "quality": "recsys.bench.quality:quality_command",
        "defaults": "recsys.bench.quality:defaults_command",
        "playcounts": "recsys.bench.playcounts:playcounts_command",
        "serve": "recsys.bench.serve:serve_bench_command",
        "serve-cpu": "recsys.bench.serve_cpu:serve_cpu_command",
        "speed": "recsys.bench.speed:speed_bench_command",
        "negative": "recsys.bench.negative:negative_command",
        "cart": "recsys.bench.cart:cart_command",
        "cold-start": "recsys.bench.cold_start:cold_start_command",
        "abtest": "recsys.bench.abtest:abtest_command",
    }),
    help="Benchmarks: quality, defaults, serving, A/B tests.", no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")
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
        from recsys.core.settings import Settings

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
    from recsys.local import services

    local = services.start()
    for name, value in local.env().items():
        typer.echo(f"{name}={value}")


@services_app.command("stop")
def services_stop() -> None:
    from recsys.local import services

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
    from recsys.core.redact import mask_url
    from recsys.core.settings import Settings
    from recsys.local import services

    url = services.write_airflow_env(Settings(), env_file)
    console.print(f"Airflow metadata database: {mask_url(url)} (settings in {env_file})")


@app.command("init-db")
def init_db() -> None:
    """Create the shop tables (interactions, products) and the quality history (recsys_runs) in
    the configured schema."""
    from recsys.core import db
    from recsys.core.settings import Settings

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
    from recsys.core.settings import Settings
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
    from recsys.core.settings import Settings
    from recsys.pipeline import stages

    settings = Settings()
    try:
        run = stages.plan_run(settings, _end(end), _params(overrides), use_tuned)
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
    from recsys.core.settings import Settings
    from recsys.pipeline.stages import run_pipeline

    try:
        result = run_pipeline(Settings(), _end(end), _params(param), use_tuned, progress=True)
    except RecsysError as error:
        raise _fail(error) from error
    if result.experiment is not None:
        console.print(result.experiment.summary, highlight=False)
        for alert in result.experiment.alerts:
            console.print(f"[red]{alert}[/red]", highlight=False)
    console.print(f"[green]{result.evaluation.reason}[/green]")
    console.print(f"published version {result.publish.version} for {result.publish.users:,} users")


@app.command("tune")
def tune_command(
    end: EndOption = None,
    trials: Annotated[int, typer.Option(help="Search budget per family: number of trials.")] = 40,
    lookback_days: int = PipelineParams().lookback_days,
    holdout_days: int = PipelineParams().holdout_days,
    model: Annotated[list[str] | None, typer.Option(
        help="A family to tune besides ALS (repeatable): bpr, item_knn, ease; ALS is always tuned.")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="Fits per trial (seeds seed, seed + 1, ...): mean ± sd.")] = TUNE_REPEATS,
) -> None:
    """Tune ALS and the families asked for on the shop's recent data (time-based validation);
    later runs use the result."""
    from recsys.core.settings import Settings
    from recsys.pipeline import stages
    from recsys.pipeline.tune import tuned_path

    settings = Settings()
    search = PipelineParams(lookback_days=lookback_days, holdout_days=holdout_days, confidence_scaling="none")
    try:
        run = stages.plan_run(settings, _end(end), search, use_tuned=False)
        stages.extract_stage(settings, run, progress=True)
        stages.matrix_stage(settings, run)
        tuned = stages.tune_stage(settings, run, trials, ("als", *(model or [])), repeats)
    except RecsysError as error:
        raise _fail(error) from error
    where = tuned_path(settings) if run.store is None else run.store.url(stages.TUNED)
    console.print(f"chosen {tuned.params} {tuned.family_params()} in {tuned.seconds:.1f} s "
                  f"({tuned.trials} trials per family, {tuned.repeats} fits each) -> {where}")
    console.print(f"result {tuned.result_id} {tuned.decision}")
    for family, validation in [("als", tuned.validation),
                               *((name, entry["validation"]) for name, entry in tuned.families.items() if "validation" in entry)]:
        console.print(f"{family} validation MAP@{search.k}: chosen {validation['chosen']['map']:.4f} ± "
                      f"{validation['chosen_sd']['map']:.4f}, starting params {validation['starting_params']['map']:.4f}")


@app.command("show")
def show(
    user: Annotated[list[str] | None, typer.Option(help="User id to show (repeatable).")] = None,
    users: Annotated[int, typer.Option(help="Show this many users if --user is not given.")] = 3,
) -> None:
    """Print live recommendations, top buys and model metrics read back from Redis."""
    from recsys import storage
    from recsys.core.settings import Settings
    from recsys.pipeline import stages
    from recsys.storage import reads

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
    from recsys.pipeline import stages

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
    for family, entry in tuned.families.items():
        if "params" not in entry:
            console.print(f"  {family}: not tuned ({entry.get('skipped', '')})", soft_wrap=True)
            continue
        carried = f", carried from result {entry['carried_from']}" if "carried_from" in entry else ""
        console.print(f"  {family}: {json.dumps(entry['params'])}; validation MAP@K "
                      f"{entry['validation']['chosen']['map']:.4f}{carried}", soft_wrap=True)


@app.command("history")
def history_command(
    limit: Annotated[int, typer.Option(min=1, help="How many runs, newest first.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line, every column.")] = False,
) -> None:
    """The quality history: every evaluated run, its metrics, the gate's decision and what publish did."""
    from recsys.core.settings import Settings
    from recsys.pipeline import history

    rows = history.recent_runs(Settings(), limit)
    if as_json:
        for row in rows:
            typer.echo(history.as_json(row))
        return
    table = Table("recorded at", "window end", "status", "model MAP@K", "popularity MAP@K", "version",
                  "interactions", "train s", "run", "family (candidates' validation MAP@K)")
    for row in rows:
        model, popularity = row["metrics"]["model"], row["metrics"]["popularity"]
        table.add_row(
            f"{row['recorded_at']:%Y-%m-%d %H:%M:%S}", f"{row['window_end']:%Y-%m-%d %H:%M}", row["status"],
            f"{model['map']:.4f} @{model['k']}", f"{popularity['map']:.4f}", row["published_version"] or "",
            f"{row['interactions']:,}" if row["interactions"] is not None else "",
            f"{row['train_seconds']:.1f}" if row["train_seconds"] is not None else "", row["run_key"],
            " ".join([row["metrics"].get("family", "als")] + [
                f"{name}:{metrics['map']:.4f}" for name, metrics in row["metrics"].get("candidates", {}).items()]),
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
    from recsys.core.settings import Settings
    from recsys.pipeline import stages
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
    from recsys import storage
    from recsys.core.settings import Settings
    from recsys.pipeline import stages
    from recsys.storage import versions

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
    from recsys import storage
    from recsys.core.settings import Settings
    from recsys.storage import versions

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
    from recsys.core.settings import Settings
    from recsys.pipeline import stages

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
    from recsys.core.settings import Settings

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
    from recsys.core.settings import Settings

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
    from recsys.core.settings import Settings

    if not rules.remove_rule(Settings(), rule_id):
        raise _fail(RecsysError(f"no rule with id {rule_id}"))
    console.print(f"rule {rule_id} removed")


@experiments_app.command("start")
def experiments_start(
    name: Annotated[str, typer.Argument(help="The experiment's name (a-z 0-9 _ . -); never reused.")],
    variant: Annotated[
        list[str], typer.Option(help="NAME:SHARE, 2 or more; the first is the control. Shares sum to at most 1.")
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="VARIANT.PARAM=VALUE: a serve-time or training param of a variant other than "
                     "the control (VALUE as JSON), repeatable."),
    ] = None,
    metric: Annotated[str, typer.Option(help="Primary metric: click-through or conversion.")] = "click-through",
    guardrail: Annotated[
        list[str] | None,
        typer.Option(help="METRIC[:MAX_DROP]: stop a variant significantly worse on it (default: the primary metric)."),
    ] = None,
    start: Annotated[datetime | None, typer.Option("--start", help="Start (ISO 8601; UTC if no offset). Default: now.")] = None,
    end: Annotated[datetime | None, typer.Option("--end", help="End, exclusive. Default: until stopped.")] = None,
) -> None:
    """Start an experiment: each user's variant is a salted hash of (experiment, user id); users
    outside the shares get the control."""
    from recsys.core import experiments
    from recsys.core.settings import Settings

    definition = experiments.experiment_from_options(name, variant, set_ or [], metric, guardrail, start, end)
    started = experiments.start_experiment(Settings(), definition)
    shares = ", ".join(f"{v.name} {v.share:g}" + (f" {json.dumps(v.params)}" if v.params else "") for v in started.variants)
    console.print(f"experiment {started.name} starts {started.starts_at.isoformat()}: {shares}", highlight=False, soft_wrap=True)


@experiments_app.command("list")
def experiments_list(as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False) -> None:
    """Every experiment, newest first, with its status now."""
    from recsys.core import experiments
    from recsys.core.settings import Settings

    found, now = experiments.list_experiments(Settings()), datetime.now(UTC)
    if as_json:
        for experiment in found:
            typer.echo(json.dumps({**experiment.to_dict(), "status": experiment.status(now)}))
        return
    table = Table("name", "status", "variants", "metric", "guardrails", "start", "end")
    for experiment in found:
        table.add_row(
            experiment.name, experiment.status(now),
            "; ".join(f"{v.name} {v.share:g}" + (" (stopped)" if v.stopped_at else "") for v in experiment.variants),
            experiment.primary_metric, ", ".join(f"{g.metric}:{g.max_drop:g}" for g in experiment.guardrails),
            f"{experiment.starts_at:%Y-%m-%d %H:%M}",
            "" if experiment.ends_at is None else f"{experiment.ends_at:%Y-%m-%d %H:%M}",
        )
    console.print(table)
    if not found:
        console.print("no experiment yet: `recsys experiments start --help`")


@experiments_app.command("stop")
def experiments_stop(
    name: Annotated[str, typer.Argument(help="The experiment's name.")],
    reason: Annotated[str | None, typer.Option(help="Why, for whoever reads the report later.")] = None,
) -> None:
    """Stop an experiment now: everyone gets the control from the next answer on."""
    from recsys.core import experiments
    from recsys.core.settings import Settings

    stopped = experiments.stop_experiment(Settings(), name, reason)
    console.print(f"experiment {stopped.name} stopped at {stopped.stopped_at.isoformat()}", highlight=False)  # type: ignore[union-attr]


@experiments_app.command("report")
def experiments_report(
    name: Annotated[str, typer.Argument(help="The experiment's name.")],
    as_json: Annotated[bool, typer.Option("--json", help="The whole report as one JSON object.")] = False,
    act: Annotated[
        bool, typer.Option("--act/--no-act", help="Stop the variants a guardrail finds significantly worse (recorded).")
    ] = True,
    html_path: Annotated[
        Path | None, typer.Option("--html", help="Also write the report as a self-contained HTML page with plots.")
    ] = None,
) -> None:
    """Per variant and per day: exposed users, click-through and conversion with 95 % intervals,
    the lift over the control, the sample-ratio check and the guardrails' decisions."""
    from recsys.core.settings import Settings
    from recsys.pipeline.experiments import report

    result = report(Settings(), name, act=act)
    from recsys.pipeline.report import estimate_text, experiment_page, lift_text

    if html_path is not None:
        html_path.write_text(experiment_page(result))
    if as_json:
        typer.echo(json.dumps(result))
        return
    console.print(f"experiment {name} ({result['status']}), analysed until {result['analysed_until']}", highlight=False)
    table = Table("variant", "users", "lists", "click-through", "lift", "conversion", "lift")
    for variant in result["variants"]:
        lifts = variant["lift"] or {}
        table.add_row(
            variant["name"] + (" (control)" if variant["control"] and variant["name"] != "control" else "")
            + (" (stopped)" if variant["stopped_at"] else ""),
            f"{variant['exposed_users']:,}", f"{variant['lists']:,}", estimate_text(variant["click_through"]),
            lift_text(lifts.get("click_through")), estimate_text(variant["conversion"]), lift_text(lifts.get("conversion")),
        )
    console.print(table)
    srm = result["srm"]
    console.print(
        f"sample ratio: p = {srm['p_value']:.4g} " + ("[red]MISMATCH[/red]: the split is not the configured one"
                                                     if srm["alarm"] else "(as configured)"), highlight=False,
    )
    for check in result["guardrails"]:
        console.print(f"guardrail {check['metric']} on {check['variant']}: {check['decision']}", highlight=False)
    if html_path is not None:
        console.print(f"HTML report with plots: {html_path}", highlight=False, soft_wrap=True)

