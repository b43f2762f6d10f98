"""Uploaded documents: compressed sessions kept on disk, the recently used ones in memory.

Each document is a directory ``<root>/<id>/`` holding the saved session (nugget cache and
counters) and ``meta.json``; it is written under a temporary name (``.staging-<pid>-<host>-<id>``),
flushed to disk (files and folders fsynced) and renamed, so a crash never leaves half a document;
a delete renames it to ``.deleted-*`` before removing it. What a crashed writer or deleter left
is removed at start. Memory holds the most recently used sessions up to a byte budget (least
recently used leave memory first, never the disk). Optional limits cap the number of documents
and their bytes on disk. Several processes (Ray Serve replicas) may share the directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from nugget2d.runtime.session import StreamingSession

from .errors import APIError

log = logging.getLogger("nugget2d.serve")

_ID = re.compile(r"^doc-[0-9a-f]{24}$")
_STAGING = re.compile(r"^\.staging-(\d+)-(.+)-doc-[0-9a-f]{24}$")  # pid, host, id of the writer
FOREIGN_STAGING_MAX_AGE_S = 24 * 3600  # a writer on another host cannot be checked: its folder is left this long
_MIB = 2**20


class DocumentDamaged(Exception):
    """A stored document exists but cannot be read back (a server-side fault)."""


@dataclass
class DocumentInfo:
    """What the API reports about a document."""

    id: str
    tokens: int
    cache_tokens: int
    cache_bytes: int
    full_kv_bytes: int
    created: int
    name: str | None = None

    def to_dict(self) -> dict:
        """The JSON object of ``/v1/documents`` responses."""
        return {"object": "document", **asdict(self)}


class DocumentStore:
    """Documents by id: on disk always, in memory while recently used and within ``memory_bytes``."""

    def __init__(
        self,
        root: Path,
        memory_bytes: int,
        on_change: Callable[[int, int], None] | None = None,
        max_documents: int | None = None,
        quota_bytes: int | None = None,
    ) -> None:
        self.root, self.memory_bytes = Path(root), memory_bytes
        self.on_change = on_change  # called with (documents in memory, their bytes) when those change
        self.max_documents, self.quota_bytes = max_documents, quota_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self.memory: OrderedDict[str, StreamingSession] = OrderedDict()
        self.lock = threading.Lock()
        self._remove_leftovers()

    def _dir(self, doc_id: str) -> Path:
        if not _ID.match(doc_id):
            raise KeyError(doc_id)
        return self.root / doc_id

    def add(self, session: StreamingSession, name: str | None = None) -> DocumentInfo:
        """Store a freshly compressed session under a new id and return its description;
        ``APIError`` 413/507 when the limits leave no room for it."""
        stats = session.stats
        info = DocumentInfo(
            id=f"doc-{uuid.uuid4().hex[:24]}",
            tokens=stats.tokens_ingested,
            cache_tokens=stats.cache_tokens,
            cache_bytes=stats.cache_bytes,
            full_kv_bytes=stats.full_kv_bytes,
            created=int(time.time()),
            name=name,
        )
        staging = self.root / f".staging-{os.getpid()}-{socket.gethostname()}-{info.id}"
        try:
            session.save(staging)
            (staging / "meta.json").write_text(json.dumps(asdict(info)))
            self.check_room(_folder_bytes(staging))
            _sync_folder(staging)
            staging.rename(self._dir(info.id))
            _fsync(self.root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone after the rename; a failed write's remains otherwise
        with self.lock:
            self._remember(info.id, session)
        return info

    def check_room(self, new_bytes: int = 0) -> None:
        """``APIError`` 507 unless one more document of ``new_bytes`` on disk fits the limits
        (413 when it alone exceeds the byte quota)."""
        if self.max_documents is None and self.quota_bytes is None:
            return
        sizes = [_folder_bytes(path) for path in self.root.glob("doc-*")]
        if self.max_documents is not None and len(sizes) >= self.max_documents:
            raise _full(f"the server holds its limit of {self.max_documents} documents; delete some first")
        if self.quota_bytes is None:
            return
        quota = f"the documents quota of {self.quota_bytes / _MIB:.2f} MiB"
        if new_bytes > self.quota_bytes:
            raise APIError(
                413,
                f"this document's compressed cache ({new_bytes / _MIB:.2f} MiB) alone exceeds {quota}; "
                "send a shorter document",
                code="document_too_large",
            )
        used = sum(sizes)
        if used + max(new_bytes, 1) > self.quota_bytes:
            needed = f" ({new_bytes / _MIB:.2f} MiB more)" if new_bytes else ""
            raise _full(f"the stored documents use {used / _MIB:.2f} MiB of {quota}{needed}; delete some first")

    def info(self, doc_id: str) -> DocumentInfo:
        """The description of ``doc_id``; ``KeyError`` if there is no such document."""
        try:
            return DocumentInfo(**json.loads((self._dir(doc_id) / "meta.json").read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise KeyError(doc_id) from err

    def list(self) -> list[DocumentInfo]:
        """Every stored document, oldest first."""
        found = []
        for path in self.root.glob("doc-*"):
            try:
                found.append(self.info(path.name))
            except KeyError:
                continue
        return sorted(found, key=lambda info: (info.created, info.id))

    def session(self, doc_id: str, model, tokenizer) -> StreamingSession:
        """The stored session of ``doc_id`` (read from disk if not in memory); callers fork it
        before use. ``KeyError`` if there is no such document (also when a delete wins a race
        with this read), :class:`DocumentDamaged` if it cannot be read."""
        path = self._dir(doc_id)
        if not (path / "meta.json").is_file():
            self._forget(doc_id)  # deleted by another process
            raise KeyError(doc_id)
        with self.lock:
            if doc_id in self.memory:
                self.memory.move_to_end(doc_id)
                return self.memory[doc_id]
        try:
            session = StreamingSession.load(path, model, tokenizer)
        except (ValueError, OSError) as err:
            if not (path / "meta.json").is_file():  # deleted while it was read
                raise KeyError(doc_id) from err
            raise DocumentDamaged(doc_id) from err
        with self.lock:  # delete() renames before it takes the lock: a document deleted meanwhile is gone here
            if not (path / "meta.json").is_file():
                raise KeyError(doc_id)
            self._remember(doc_id, session)
        return session

    def delete(self, doc_id: str) -> DocumentInfo:
        """Remove ``doc_id`` from disk and memory; return what it was. ``KeyError`` if unknown."""
        info = self.info(doc_id)
        trash = self.root / f".deleted-{doc_id}-{uuid.uuid4().hex[:8]}"
        try:
            self._dir(doc_id).rename(trash)
        except OSError as err:
            raise KeyError(doc_id) from err
        self._forget(doc_id)  # after the rename, so no reader can put it back (see session())
        shutil.rmtree(trash, ignore_errors=True)
        return info

    def _forget(self, doc_id: str) -> None:
        with self.lock:
            self.memory.pop(doc_id, None)
            self._report_sizes()

    def _remove_leftovers(self) -> None:
        """Remove what crashed deletes and writes left: every ``.deleted-*`` folder, and each
        ``.staging-*`` folder whose writer no longer runs."""
        host, now = socket.gethostname(), time.time()
        for path in self.root.glob(".deleted-*"):
            shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob(".staging-*"):
            owner = _STAGING.match(path.name)
            if owner and owner.group(2) == host:
                stale = not _running(int(owner.group(1)))
            elif owner:
                stale = now - path.stat().st_mtime > FOREIGN_STAGING_MAX_AGE_S
            else:
                stale = True  # an older naming, without its writer
            if stale:
                log.warning("removing %s, left by a document write that did not finish", path.name)
                shutil.rmtree(path, ignore_errors=True)

    @property
    def bytes_in_memory(self) -> int:
        """Bytes of the nugget caches held in memory."""
        with self.lock:
            return sum(session.cache.nbytes for session in self.memory.values())

    def _remember(self, doc_id: str, session: StreamingSession) -> None:
        self.memory[doc_id] = session
        self.memory.move_to_end(doc_id)
        total = sum(s.cache.nbytes for s in self.memory.values())
        while total > self.memory_bytes and len(self.memory) > 1:
            _, dropped = self.memory.popitem(last=False)
            total -= dropped.cache.nbytes
        if total > self.memory_bytes:  # one document larger than the whole budget: read it from disk each time
            self.memory.clear()
        self._report_sizes()

    def _report_sizes(self) -> None:
        if self.on_change is not None:
            self.on_change(len(self.memory), sum(s.cache.nbytes for s in self.memory.values()))


def _full(message: str) -> APIError:
    return APIError(507, message, code="documents_quota")


def _folder_bytes(folder: Path) -> int:
    """Bytes of the files in ``folder`` (0 for what vanishes meanwhile)."""
    total = 0
    for path in folder.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except OSError:
            continue
    return total


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    """Flush every file under ``folder``, then the folders holding them."""
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):  # the deepest first
        _fsync(path)
    _fsync(folder)


def _running(pid: int) -> bool:
    """True if a process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True
