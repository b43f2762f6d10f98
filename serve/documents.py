"""Uploaded documents: compressed sessions kept on disk, the recently used ones in memory.

Each document is a directory ``<root>/<id>/`` holding the saved session (nugget cache and
counters) and ``meta.json``; it is written under a temporary name and renamed, so a crash never
leaves half a document. Memory holds the most recently used sessions up to a byte budget
(least recently used leave memory first, never the disk). Several processes (Ray Serve
replicas) may share the directory.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from nugget2d.runtime.session import StreamingSession

_ID = re.compile(r"^doc-[0-9a-f]{24}$")


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

    def __init__(self, root: Path, memory_bytes: int, on_change: Callable[[int, int], None] | None = None) -> None:
        self.root, self.memory_bytes = Path(root), memory_bytes
        self.on_change = on_change  # called with (documents in memory, their bytes) when those change
        self.root.mkdir(parents=True, exist_ok=True)
        self.memory: OrderedDict[str, StreamingSession] = OrderedDict()
        self.lock = threading.Lock()

    def _dir(self, doc_id: str) -> Path:
        if not _ID.match(doc_id):
            raise KeyError(doc_id)
        return self.root / doc_id

    def add(self, session: StreamingSession, name: str | None = None) -> DocumentInfo:
        """Store a freshly compressed session under a new id and return its description."""
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
        staging = self.root / f".staging-{info.id}"
        session.save(staging)
        (staging / "meta.json").write_text(json.dumps(asdict(info)))
        staging.rename(self._dir(info.id))
        with self.lock:
            self._remember(info.id, session)
        return info

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
        before use. ``KeyError`` if there is no such document."""
        path = self._dir(doc_id)
        if not (path / "meta.json").is_file():
            with self.lock:
                self.memory.pop(doc_id, None)  # deleted by another process
                self._report_sizes()
            raise KeyError(doc_id)
        with self.lock:
            if doc_id in self.memory:
                self.memory.move_to_end(doc_id)
                return self.memory[doc_id]
        session = StreamingSession.load(path, model, tokenizer)
        with self.lock:
            self._remember(doc_id, session)
        return session

    def delete(self, doc_id: str) -> DocumentInfo:
        """Remove ``doc_id`` from memory and disk; return what it was. ``KeyError`` if unknown."""
        info = self.info(doc_id)
        with self.lock:
            self.memory.pop(doc_id, None)
            self._report_sizes()
        trash = self.root / f".deleted-{doc_id}-{uuid.uuid4().hex[:8]}"
        try:
            self._dir(doc_id).rename(trash)
        except OSError as err:
            raise KeyError(doc_id) from err
        shutil.rmtree(trash, ignore_errors=True)
        return info

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
