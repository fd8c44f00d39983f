"""A shared artifact store (any fsspec URL: ``s3://``, ``gs://``, ``file://``…) mirrored into each
worker's local artifacts folder, so stages of one run can run on different machines.

Stages keep reading and writing local files; around them, :func:`pull` fetches a finished
folder from the store and :func:`push` uploads one. A folder in the store is

    <key>/pushed.json        names the upload that is complete, with each file's size and sha256
    <key>/<upload id>/...    the files of that upload

The marker is written last, in one step, so a reader sees either the previous complete upload or
the new one, never a half-uploaded folder, and no object store has to rename a whole folder.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys.core.errors import CorruptArtifactError, RecsysError

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

MARKER = "pushed.json"
# a pull starts over when a push replaced the upload it was reading; more than a few in a row is a busy loop
PULL_TRIES = 3


@dataclass(frozen=True)
class ArtifactStore:
    fs: AbstractFileSystem
    root: str  # the store's folder inside ``fs``, without protocol

    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def url(self, *parts: str) -> str:
        return self.fs.unstrip_protocol(self.path(*parts))


def open_store(url: str, storage_options: Mapping[str, Any] | None = None) -> ArtifactStore:
    """The store at ``url``; ``storage_options`` go to the fsspec filesystem (credentials, endpoint)."""
    from fsspec.core import url_to_fs  # only runs with a shared store load fsspec

    fs, root = url_to_fs(url, **(storage_options or {}))
    return ArtifactStore(fs, root.rstrip("/"))


@dataclass(frozen=True)
class StoredFile:
    size: int
    sha256: str


@dataclass(frozen=True)
class Upload:
    """What ``pushed.json`` says: the complete upload of a folder and its files."""

    upload_id: str
    files: dict[str, StoredFile]  # path inside the folder (``/``-separated) -> size and digest

    def to_json(self) -> str:
        files = {name: {"size": entry.size, "sha256": entry.sha256} for name, entry in self.files.items()}
        return json.dumps({"upload_id": self.upload_id, "files": files}, indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> Upload:
        values = json.loads(text)
        return cls(values["upload_id"], {name: StoredFile(**entry) for name, entry in values["files"].items()})


def sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def pushed(store: ArtifactStore, key: str) -> Upload | None:
    """The complete upload of folder ``key``, or None if no push of it has finished."""
    try:
        return Upload.from_json(store.fs.cat_file(store.path(key, MARKER)))
    except FileNotFoundError:
        return None


def push(store: ArtifactStore, local: Path, key: str) -> Upload:
    """Upload every file under ``local`` as folder ``key``, replacing its previous upload."""
    files = {
        path.relative_to(local).as_posix(): StoredFile(path.stat().st_size, sha256(path))
        for path in sorted(local.rglob("*"))
        if path.is_file()
    }
    upload = Upload(uuid.uuid4().hex, files)
    for name in files:
        target = store.path(key, upload.upload_id, name)
        store.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        store.fs.put_file(str(local / name), target)
    previous = pushed(store, key)
    # a single small object, complete when it appears: a local rename, a copy on object stores
    draft = store.path(key, f"{MARKER}.{upload.upload_id}.part")
    store.fs.makedirs(store.path(key), exist_ok=True)  # a folder without files has none yet
    store.fs.pipe_file(draft, upload.to_json().encode())
    store.fs.mv(draft, store.path(key, MARKER))
    if previous is not None:
        store.fs.rm(store.path(key, previous.upload_id), recursive=True)
    return upload


def pull(store: ArtifactStore, key: str, local: Path) -> Upload:
    """Make ``local`` an exact copy of folder ``key``'s complete upload.

    Files already there with the same size and digest are kept (a worker that produced or pulled
    them before downloads nothing); downloads go to a ``.part`` name first and replace the file
    only once their size and sha256 match the upload's record, so neither an interrupted pull nor
    a damaged object ever leaves a file that looks whole. A push that replaces the upload while
    it is being read (and removes the old one's files) makes the pull start over on the new one.
    """
    for _ in range(PULL_TRIES):
        upload = pushed(store, key)
        if upload is None:
            raise FileNotFoundError(f"{store.url(key)} has no complete upload: the stage writing it has not finished")
        try:
            _download(store, key, upload, local)
        except FileNotFoundError:
            if pushed(store, key) == upload:
                raise  # still the complete upload: one of its files is really gone
            continue
        for path in list(local.rglob("*")):
            if path.is_file() and path.relative_to(local).as_posix() not in upload.files and not path.name.endswith(".part"):
                path.unlink()  # left from an older upload: the local copy mirrors the store exactly
        return upload
    raise RecsysError(f"{store.url(key)} was replaced {PULL_TRIES} times while being pulled; pull it again later")


def _download(store: ArtifactStore, key: str, upload: Upload, local: Path) -> None:
    local.mkdir(parents=True, exist_ok=True)
    for name, entry in upload.files.items():
        target = local / name
        if target.is_file() and _is_recorded(target, entry):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}.part")  # never another puller's
        source = store.path(key, upload.upload_id, name)
        try:
            store.fs.get_file(source, str(part))
            if not _is_recorded(part, entry):
                raise CorruptArtifactError(
                    f"{store.fs.unstrip_protocol(source)} has {part.stat().st_size} bytes with sha256 "
                    f"{sha256(part)[:12]}…, not the {entry.size} bytes with sha256 {entry.sha256[:12]}… its "
                    f"upload recorded; rerun the stage that writes {key.rsplit('/', 1)[-1]} to push it again"
                )
            part.replace(target)
        finally:
            part.unlink(missing_ok=True)


def _is_recorded(path: Path, entry: StoredFile) -> bool:
    """``path`` holds the file the upload recorded: same size, same sha256."""
    return path.stat().st_size == entry.size and sha256(path) == entry.sha256
