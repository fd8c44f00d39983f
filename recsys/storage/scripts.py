"""The Lua scripts of the storage layer (``lua/*.lua``), run on one hash slot each.

``run`` and ``run_async`` use EVALSHA through redis-py's ``Script`` (loaded once per server, again
after a restart or a failover). Pipelined calls (``queue``) send the script text with EVAL: a
pipeline cannot reload a script its node lost, and the text is small beside the payloads.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any


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


async def run_async(client: Any, name: str, keys: list[str], args: list) -> Any:
    return await _script(client, name)(keys=keys, args=args)


def queue(pipe: Any, name: str, keys: list[str], args: list) -> None:
    """Add script ``name`` to a pipeline (a single node's or a cluster's, non-transactional)."""
    pipe.execute_command("EVAL", text(name), len(keys), *keys, *args)
