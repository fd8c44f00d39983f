"""The local Redis Cluster harness (recsys.local.cluster) on real redis-server processes, driven
through redis-py's RedisCluster as the storage layer will be: keys spread, a killed master loses
no write a replica acknowledged, a slot migration under writes loses no key, stop cleans up.
Also pins the redis-py cluster behaviours the storage layer relies on."""

from __future__ import annotations

import collections
import itertools
import os
import random
import threading
import time
from contextlib import suppress
from pathlib import Path

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from recsys.local.cluster import HASH_SLOTS, ClusterError, LocalCluster


def startup_nodes(url: str) -> list[ClusterNode]:
    addresses = url.removeprefix("redis+cluster://").split(",")
    return [ClusterNode(host, int(port)) for host, port in (address.rsplit(":", 1) for address in addresses)]


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(masters=3, replicas=1) as local:
        yield local


@pytest.fixture
def client(cluster: LocalCluster):
    cluster_client = RedisCluster(startup_nodes=startup_nodes(cluster.url), decode_responses=True)
    yield cluster_client
    cluster_client.close()


def owner_port(cluster: LocalCluster, client: RedisCluster, key: str) -> int:
    slot = client.keyslot(key)
    return next(m.port for m in cluster.masters() if any(a <= slot <= b for a, b in m.slots))


def read_all(client: RedisCluster, keys: list[str]) -> dict[str, str | None]:
    pipe = client.pipeline(transaction=False)  # one round trip per node, across slots
    for key in keys:
        pipe.get(key)
    return dict(zip(keys, pipe.execute(), strict=True))


def test_the_cluster_is_three_masters_each_with_a_replica_and_keys_spread_over_all(cluster, client):
    assert cluster.url.startswith("redis+cluster://127.0.0.1:") and cluster.url.count(",") == 2
    nodes = cluster.nodes()
    masters = [n for n in nodes if n.role == "master"]
    assert len(masters) == 3 and all(n.pid for n in nodes)
    assert sum(m.slot_count for m in masters) == HASH_SLOTS
    assert sorted(n.master_port for n in nodes if n.role == "replica") == sorted(m.port for m in masters)

    keys = [f"spread:{i}" for i in range(3000)]
    pipe = client.pipeline(transaction=False)
    for i, key in enumerate(keys):
        pipe.set(key, i)
    pipe.execute()
    per_master = {
        node.port: sum(1 for _ in node.redis_connection.scan_iter(match="spread:*", count=1000))
        for node in client.get_primaries()
    }
    assert sorted(per_master) == sorted(m.port for m in masters)
    assert sum(per_master.values()) == len(keys) and min(per_master.values()) > 700, per_master
    assert read_all(client, keys) == {key: str(i) for i, key in enumerate(keys)}


def acknowledged_set(client: RedisCluster, key: str, value: int) -> int | None:
    """SET on the key's master, then WAIT on the same connection: how many replicas have the
    write (None if it failed). RedisCluster sends a bare WAIT to its default node, where it
    acknowledges nothing of this write."""
    node = client.get_node_from_key(key)
    try:
        with node.redis_connection.pipeline(transaction=False) as pipe:
            return pipe.set(key, value).wait(1, 100).execute()[1]
    except redis.RedisError:  # master gone, MOVED after the promotion, cluster down meanwhile
        with suppress(redis.RedisError):
            client.nodes_manager.initialize()
        time.sleep(0.02)
        return None


@pytest.fixture
def whole_cluster(cluster: LocalCluster):
    """Start again what a test killed, so the next test finds every master with a replica."""
    yield cluster
    for node in cluster.nodes():
        if node.role == "down":
            cluster.restart(node.port)


def test_a_killed_master_loses_no_acknowledged_write_and_the_client_continues(whole_cluster, client):
    cluster = whole_cluster
    victim = cluster.masters()[0]
    victim_replicas = {r.port for r in cluster.replicas_of(victim.port)}
    acknowledged: dict[str, int] = {}  # a replica has it
    after_promotion: list[str] = []  # written once promoted (no replica acknowledges the promoted
    # node's writes until the victim comes back)
    promoted, stop = threading.Event(), threading.Event()

    def write() -> None:
        for i in itertools.count():
            if stop.is_set():
                return
            key = f"ack:{i}"
            replicas = acknowledged_set(client, key, i)
            if replicas:
                acknowledged[key] = i
            if replicas is not None and promoted.is_set():
                after_promotion.append(key)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        deadline = time.monotonic() + 10
        while len(acknowledged) < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(acknowledged) >= 300, "the writer did not get going"
        new_master = cluster.kill_master(victim.port)
        promoted.set()
        deadline = time.monotonic() + 10
        while len(after_promotion) < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        writer.join()

    assert new_master.port in victim_replicas
    assert {n.port: n.role for n in cluster.nodes()}[victim.port] == "down"
    # the promoted node took the victim's slots, and the same client went on writing to them
    assert new_master.slots == victim.slots
    assert len(after_promotion) >= 60
    assert any(owner_port(cluster, client, key) == new_master.port for key in after_promotion)
    on_victim = [key for key in acknowledged if key not in after_promotion and owner_port(cluster, client, key) == new_master.port]
    assert len(on_victim) > 50  # acknowledged writes on the killed master before it died
    assert read_all(client, list(acknowledged)) == {key: str(value) for key, value in acknowledged.items()}

    cluster.restart(victim.port)  # comes back empty and replicates from the promoted node
    rejoined = {n.port: n for n in cluster.nodes()}[victim.port]
    assert (rejoined.role, rejoined.master_port) == ("replica", new_master.port)


def test_failover_swaps_roles_and_keeps_every_key(cluster, client):
    master = cluster.masters()[1]
    replica = cluster.replicas_of(master.port)[0]
    keys = [f"failover:{i}" for i in range(500)]
    for i, key in enumerate(keys):
        assert acknowledged_set(client, key, i) == 1
    new_master = cluster.failover(master.port)
    assert new_master.port == replica.port and new_master.slots == master.slots
    roles = {n.port: (n.role, n.master_port) for n in cluster.nodes()}
    assert roles[master.port] == ("replica", replica.port)
    assert read_all(client, keys) == {key: str(i) for i, key in enumerate(keys)}


def test_a_slot_migration_during_writes_loses_no_key(cluster, client):
    source, target = cluster.masters()[0], cluster.masters()[1]
    # 10 hash tags on the source's slots with 300 keys each: its fullest slots, which move
    tags = [t for t in (f"{{mig{i}}}" for i in range(2000)) if owner_port(cluster, client, t) == source.port][:10]
    expected: dict[str, int] = {}
    pipe = client.pipeline(transaction=False)
    for tag, i in itertools.product(tags, range(300)):
        pipe.set(f"{tag}:{i}", 0)
        expected[f"{tag}:{i}"] = 0
    pipe.execute()
    set_pair = client.register_script("redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1])")
    refused: collections.Counter[str] = collections.Counter()
    stop = threading.Event()
    done = [0]

    def until_accepted(write) -> None:
        """A multi-key command whose keys the move has split gets TRYAGAIN, which redis-py turns
        into ClusterError('TTL exhausted') after 16 quick tries: the caller tries again."""
        deadline = time.monotonic() + 10
        while True:
            try:
                return write()
            except (redis.exceptions.ClusterError, redis.exceptions.TryAgainError) as error:
                refused[type(error).__name__] += 1
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def write() -> None:
        rng = random.Random(7)
        for n in itertools.count(1):
            if stop.is_set():
                return
            tag = rng.choice(tags)
            key = f"{tag}:{rng.randrange(300)}"
            until_accepted(lambda key=key, n=n: client.set(key, n))
            expected[key] = n
            pair = [f"{tag}:pair:{n % 20}:a", f"{tag}:pair:{n % 20}:b"]
            until_accepted(lambda pair=pair, n=n: set_pair(keys=pair, args=[n]))
            expected.update(dict.fromkeys(pair, n))
            done[0] = n

    progress: list[int] = []

    def let_the_writer_write(slot: int) -> None:
        """Between two slots, wait until the writer has written again (it must not starve)."""
        deadline = time.monotonic() + 10
        while progress and done[0] == progress[-1] and time.monotonic() < deadline:
            time.sleep(0.005)
        progress.append(done[0])

    writer = threading.Thread(target=write)
    writer.start()
    try:
        time.sleep(0.3)
        migration = cluster.migrate_slots(len(tags), source.port, target.port, batch=50, on_slot_moved=let_the_writer_write)
        time.sleep(0.3)
    finally:
        stop.set()
        writer.join()

    assert sorted(migration.slots) == sorted(client.keyslot(tag) for tag in tags)
    assert migration.keys >= 300 * len(tags)
    assert progress == sorted(set(progress)), progress  # the writer went on while slots moved
    owners = {slot: owner_port(cluster, client, tag) for tag, slot in ((t, client.keyslot(t)) for t in tags)}
    assert set(owners.values()) == {target.port}
    assert {n.port: n.slot_count for n in cluster.masters()}[source.port] == source.slot_count - len(tags)
    actual = read_all(client, list(expected))
    assert actual == {key: str(value) for key, value in expected.items()}, refused


def test_redis_py_cluster_behaviours_the_storage_layer_relies_on(cluster, client):
    # a script's keys must share a slot; redis-py refuses before sending anything
    set_pair = client.register_script("return redis.call('SET', KEYS[1], ARGV[1]) and redis.call('SET', KEYS[2], ARGV[1])")
    with pytest.raises(redis.exceptions.RedisClusterException, match="same key slot"):
        set_pair(keys=["facts:a", "facts:b"], args=[1])
    # a key the script did not declare, on another slot, is refused by the server
    # (a key it did not declare on another slot of the same node is served: 6.2 checks nodes)
    get_arg = client.register_script("return redis.call('GET', ARGV[1])")
    elsewhere = next(k for k in (f"facts:{i}" for i in range(100)) if owner_port(cluster, client, k) != owner_port(cluster, client, "{facts}x"))
    with pytest.raises(redis.exceptions.ResponseError, match="non local key"):
        get_arg(keys=["{facts}x"], args=[elsewhere])
    # a Script loads itself again where the server lost it (restart, failover, SCRIPT FLUSH)
    keys = [f"{{facts{i}}}:k" for i in range(30)]  # on every master
    for key in keys:
        set_pair(keys=[key, key + "2"], args=[1])
    for node in client.get_primaries():
        node.redis_connection.script_flush()
    for key in keys:
        set_pair(keys=[key, key + "2"], args=[2])
    assert set(read_all(client, keys).values()) == {"2"}
    # pipelines: without a transaction, across nodes in order; MULTI only within one slot
    assert client.pipeline(transaction=False).set("facts:a", 1).incr("facts:b").get("facts:a").execute()[::2] == [True, "1"]
    # (a transaction returns SET as the raw "OK", not True as elsewhere)
    assert client.pipeline(transaction=True).set("{facts}t", 1).incr("{facts}t").execute() == ["OK", 2]
    with pytest.raises(redis.exceptions.CrossSlotTransactionError):
        client.pipeline(transaction=True).set("{facts}t", 1).set("{other}t", 1).execute()
    # DBSIZE (like WAIT) goes to one node unless told otherwise
    total = client.dbsize(target_nodes=RedisCluster.PRIMARIES)
    assert total == sum(node.redis_connection.dbsize() for node in client.get_primaries())
    assert client.dbsize() < total


def test_stop_leaves_no_process_and_no_folder_and_errors_name_the_node(tmp_path: Path):
    small = LocalCluster(masters=3, replicas=0, base_dir=tmp_path, timeout=3)
    with small:
        pids = [n.pid for n in small.nodes()]
        data_dir = small.data_dir
        assert data_dir.is_dir() and all(pids)
        with pytest.raises(ClusterError, match="has no live replica"):
            small.kill_master(0)
        dead = small.masters()[0].port
        small.kill(dead)
        with pytest.raises(ClusterError, match=rf"did not complete within 3 s: .*127\.0\.0\.1:{dead} \(log .*/redis\.log\)"):
            small.wait_ok()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not data_dir.exists() and list(tmp_path.iterdir()) == []


def test_a_node_that_does_not_start_is_named_with_its_log(tmp_path: Path):
    broken = tmp_path / "redis-server"
    broken.write_text("#!/bin/sh\necho 'FATAL CONFIG FILE ERROR (simulated)'\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(ClusterError, match=r"node 127\.0\.0\.1:\d+ \(log .*/node-0/redis\.log\) exited with code 1 .*simulated"):
        LocalCluster(redis_server=broken, base_dir=tmp_path).start()
    assert [p.name for p in tmp_path.iterdir()] == ["redis-server"]  # its data folder is gone
    with pytest.raises(ClusterError, match="redis-server not found or not executable: /nonexistent/redis-server"):
        LocalCluster(redis_server="/nonexistent/redis-server").start()
