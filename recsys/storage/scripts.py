"""The Lua scripts of the storage layer (``lua/*.lua``), run on one hash slot each.

``run`` uses EVALSHA through redis-py's ``Script`` and ``run_async`` EVALSHA directly (each loads
the script again after a restart or a failover). Pipelined calls (``queue``) send the script text
with EVAL: a pipeline cannot reload a script its node lost, and the text is small beside the
payloads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError


@cache
def text(name: str) -> str:
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text()


def _script(client: Any, name: str) -> Any:
    """The client's ``Script`` for ``name``, registered once per client."""
    scripts = client.__dict__.setdefault("_recsys_scripts", {})
    if name not in scripts:
        scripts[name] = client.register_script(text(name))
    return scripts[name]


def run(client: Any, name: str, keys: list[str], args: list) -> Any:
    """EVALSHA script ``name`` on a blocking client (a single node or a cluster)."""
    return _script(client, name)(keys=keys, args=args)


async def run_async(client: Any, name: str, keys: Sequence[str], args: list) -> Any:
    """EVALSHA script ``name`` on an asyncio client; loaded again if the server lost it (a restart,
    a failover). Called directly rather than through redis-py's ``Script``, whose per-call checks
    cost as much as the rest of an API request's Python."""
    # the digest and key count as bytes: redis-py sends bytes as they are (~2 µs less per call)
    sha, count = _sha(name), _key_count(len(keys))
    try:
        return await client.evalsha(sha, count, *keys, *args)
    except NoScriptError:
        await client.script_load(text(name))
        return await client.evalsha(sha, count, *keys, *args)


@cache
def _sha(name: str) -> bytes:
    return hashlib.sha1(text(name).encode()).hexdigest().encode()


@cache
def _key_count(count: int) -> bytes:
    return str(count).encode()


def queue(pipe: Any, name: str, keys: list[str], args: list) -> None:
    """Add script ``name`` to a pipeline (a single node's or a cluster's, non-transactional)."""
    pipe.execute_command("EVAL", text(name), len(keys), *keys, *args)
