"""The one way to reach the cache Redis: a URL, a single node or a cluster, sync or asyncio.

- ``redis://[user:password@]host:port/db`` (``rediss://`` with TLS, ``unix://``): one node.
- ``redis+cluster://[user:password@]host:port[,host:port…]`` (``rediss+cluster://`` with TLS), or
  Gorse's spelling ``redis+cluster://host:port?addr=host2:port&addr=host3:port``: a Redis Cluster,
  reached through redis-py's ``RedisCluster`` from these seed nodes (it discovers the rest).

Both kinds retry a command once on a connection error: a pooled connection to a node that
restarted, or a node that failed over, is stale, and its first command fails with "Connection
closed by server" although the cache is up. A node that is really down fails the retry too, at
once. Timeouts are not retried: a timed-out write may have been applied.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster

from recsys.core.errors import CACHE_UNAVAILABLE
from recsys.core.redact import mask_url

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS
# what a caller may treat as "the cache is unavailable now" (503, retry later), never a bug
UNAVAILABLE = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.MasterDownError,
    redis.BusyLoadingError,
)
CACHE_UNAVAILABLE.extend(UNAVAILABLE)  # so error messages name Redis and what to check
StorageError = redis.RedisError
ScriptError = redis.ResponseError
NodeDown = redis.ConnectionError


@dataclass(frozen=True)
class ClusterTarget:
    nodes: tuple[tuple[str, int], ...]
    tls: bool
    options: dict[str, Any] = field(default_factory=dict)  # username, password


def cluster_target(url: str) -> ClusterTarget | None:
    """The seed nodes of a ``redis+cluster://`` URL; None for a single-node URL."""
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        return None
    netloc = parts.netloc.rsplit("@", 1)[-1]
    addresses = [a for a in netloc.split(",") if a] + parse_qs(parts.query).get("addr", [])
    if not addresses:
        raise ValueError(f"the cluster URL {mask_url(url)} names no host:port")
    nodes = []
    for address in addresses:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"the cluster URL {mask_url(url)} has {address!r}, not host:port")
        nodes.append((host.strip("[]"), int(port)))
    options = {}
    if "@" in parts.netloc:
        credentials = parts.netloc.rsplit("@", 1)[0]
        user, _, password = credentials.partition(":")
        options = {"username": unquote(user) or None, "password": unquote(password) or None}
    return ClusterTarget(tuple(nodes), CLUSTER_SCHEMES[parts.scheme], options)


def _retry_options(retry_class: type) -> dict[str, Any]:
    return {"retry": retry_class(NoBackoff(), 1), "retry_on_error": [redis.ConnectionError]}


# what a cluster answers while a master fails over or slots move; a blocking client of a cluster
# rides through them (``FailoverRiding``) instead of failing a publish that a retry would finish
CLUSTER_TRANSIENT = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
    redis.exceptions.MasterDownError,
    redis.exceptions.SlotNotCoveredError,
    redis.exceptions.ReadOnlyError,
)
# a failover takes about 2-3 node timeouts (15 s by default in Redis): ride through well past that
CLUSTER_RIDE_THROUGH_SECONDS = 60.0


def _unreachable(error: BaseException) -> bool:
    """redis-py says "no node of the cluster answers" with its base cluster exception (not a
    RedisError): that is the cache being down, as a ConnectionError is for one node."""
    return isinstance(error, redis.exceptions.RedisClusterException) and "cannot be connected" in str(error)


def _as_connection_error(error: redis.exceptions.RedisClusterException) -> redis.ConnectionError:
    converted = redis.ConnectionError(str(error))
    converted.__cause__ = error
    return converted


def _ride_through(call: Callable[[], Any]) -> Any:
    """``call()`` again, with a growing pause, while the cluster answers with a transient error."""
    deadline, pause = time.monotonic() + CLUSTER_RIDE_THROUGH_SECONDS, 0.05
    while True:
        try:
            return call()
        except (*CLUSTER_TRANSIENT, redis.exceptions.RedisClusterException) as error:
            if time.monotonic() >= deadline or not (isinstance(error, CLUSTER_TRANSIENT) or _unreachable(error)):
                raise
            time.sleep(pause * random.uniform(0.5, 1.5))
            pause = min(pause * 2, 0.5)


class FailoverRiding(RedisCluster):
    """A blocking cluster client whose commands and pipelines ride through a failover or a slot
    migration (retried for ``CLUSTER_RIDE_THROUGH_SECONDS``). Everything recsys sends through it
    is idempotent (HSETs of the same values, TTLs, reads, compare-and-set scripts), so a command
    applied before its connection broke may be applied again."""

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return _ride_through(lambda: super(FailoverRiding, self).execute_command(*args, **kwargs))

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ReplayedPipeline:
        if transaction:
            raise ValueError("a cluster pipeline here is never a transaction: use a script on one slot")
        return ReplayedPipeline(lambda: super(FailoverRiding, self).pipeline())


class ReplayedPipeline:
    """Records the commands of a pipeline and sends them on ``execute``; a transient cluster
    error sends them all again on a new pipeline (see ``FailoverRiding``)."""

    def __init__(self, new_pipeline: Callable[[], Any]) -> None:
        self._new_pipeline, self._queued = new_pipeline, []

    def __getattr__(self, name: str) -> Callable[..., ReplayedPipeline]:
        def queue(*args: Any, **kwargs: Any) -> ReplayedPipeline:
            self._queued.append((name, args, kwargs))
            return self

        return queue

    def execute(self) -> list:
        queued, self._queued = self._queued, []

        def send() -> list:
            pipe = self._new_pipeline()
            for name, args, kwargs in queued:
                getattr(pipe, name)(*args, **kwargs)
            return pipe.execute()

        return _ride_through(send)

    def __enter__(self) -> ReplayedPipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._queued = []


def sync_client(url: str, socket_timeout: float = 30, connect_timeout: float = 5) -> redis.Redis | RedisCluster:
    """A blocking client (pipeline stages, the CLI, tests); responses decoded as text. A
    cluster's rides through failovers (``FailoverRiding``)."""
    from redis.retry import Retry

    common = {"decode_responses": True, "socket_timeout": socket_timeout, "socket_connect_timeout": connect_timeout}
    target = cluster_target(url)
    if target is None:
        return redis.Redis.from_url(url, health_check_interval=30, **common, **_retry_options(Retry))
    return FailoverRiding(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        ssl=target.tls,
        **target.options,
        **common,
        **_retry_options(Retry),
    )


class AsyncCluster(AsyncRedisCluster):
    """An asyncio cluster client that reports a cluster none of whose nodes answers as a
    ConnectionError (503 in the API, as for a single node that is down), not as redis-py's
    generic cluster exception. It does not ride through failovers: a request answers 503 at once
    rather than waiting seconds."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except redis.exceptions.RedisClusterException as error:
            if _unreachable(error):
                raise _as_connection_error(error) from error
            raise

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> _AsyncPipeline:
        return _AsyncPipeline(super().pipeline(transaction=transaction, shard_hint=shard_hint))


class _AsyncPipeline:
    """An asyncio cluster pipeline whose execute reports an unreachable cluster as AsyncCluster does."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    async def execute(self, *args: Any, **kwargs: Any) -> list:
        try:
            return await self._pipe.execute(*args, **kwargs)
        except redis.exceptions.RedisClusterException as error:
            if _unreachable(error):
                raise _as_connection_error(error) from error
            raise

    async def __aenter__(self) -> _AsyncPipeline:
        await self._pipe.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._pipe.__aexit__(*exc_info)


def async_client(url: str, socket_timeout: float = 5, connect_timeout: float = 2) -> aioredis.Redis | AsyncRedisCluster:
    """An asyncio client (the API, the look-up page); responses decoded as text."""
    from redis.asyncio.retry import Retry

    common = {"decode_responses": True, "socket_timeout": socket_timeout, "socket_connect_timeout": connect_timeout}
    target = cluster_target(url)
    if target is None:
        return aioredis.Redis.from_url(url, **common, **_retry_options(Retry))
    return AsyncCluster(
        startup_nodes=[AsyncClusterNode(host, port) for host, port in target.nodes],
        ssl=target.tls,
        **target.options,
        **common,
        **_retry_options(Retry),
    )


def node_client(host: str, port: int, socket_timeout: float = 5) -> redis.Redis:
    """A plain client of one server (administration of a local cluster's nodes, a ping)."""
    return redis.Redis(host=host, port=port, decode_responses=True, socket_timeout=socket_timeout,
                       socket_connect_timeout=socket_timeout)


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster | AsyncRedisCluster)


def answers(url: str, timeout: float = 1.0) -> bool:
    """Whether the Redis (or every seed of the cluster) at ``url`` answers PING now."""
    try:
        client = sync_client(url, socket_timeout=timeout, connect_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (*UNAVAILABLE, redis.exceptions.RedisClusterException):
        return False
