"""Long reads that survive an interruption: a streaming session saved every few minutes while it reads,
and read on from where it stopped (``nugget2d generate --checkpoint DIR [--resume]``).

A checkpoint directory holds saved sessions (:meth:`StreamingSession.save`) named ``read-<tokens>`` and a
``latest`` file naming the newest whole one, written last (atomically), so an interruption while saving
leaves the previous one in use; older ones are removed once a newer one is named. Resuming checks that the
text read so far is the start of the input (its token ids), then reads only the rest: the session goes on
exactly as an uninterrupted read would (tested).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from .checkpoints import mark_latest
from .session import StreamingSession

LATEST = "latest"
PREFIX = "read-"


class ReadCheckpoint:
    """Where and how often a reading session is saved; ``every_s`` seconds of reading between saves."""

    def __init__(self, directory: str | Path, every_s: float = 300.0) -> None:
        if every_s <= 0:
            raise ValueError(f"the checkpoint interval must be > 0 seconds, got {every_s}")
        self.directory, self.every_s = Path(directory), float(every_s)
        self._last_save = time.monotonic()

    def latest(self) -> Path | None:
        """The newest whole saved session, or None when the directory holds none."""
        marker = self.directory / LATEST
        if not marker.is_file():
            return None
        name = marker.read_text().strip()
        saved = self.directory / name
        if not name.startswith(PREFIX) or Path(name).name != name or not (saved / "session.json").is_file():
            raise ValueError(f"{marker} names {name!r}, not a saved reading session in {self.directory}")
        return saved

    def check_new(self) -> None:
        """``ValueError`` when the directory already holds a checkpoint (a new read would overwrite it)."""
        if self.latest() is not None:
            raise ValueError(
                f"{self.directory} holds a checkpoint of an earlier read: add --resume to read on from it, "
                "or choose another --checkpoint directory"
            )

    def load(self, model, tokenizer, progress: bool = False) -> StreamingSession:
        """The session saved last; ``ValueError`` when there is none."""
        saved = self.latest()
        if saved is None:
            raise ValueError(f"--resume: no checkpoint in {self.directory} (no '{LATEST}' file); start without it")
        session = StreamingSession.load(saved, model, tokenizer)
        if session.token_ids is None:
            raise ValueError(f"{saved} was saved without its token ids: it cannot be matched to the input")
        session.progress = progress
        return session

    def save(self, session: StreamingSession) -> Path:
        """Save ``session`` as the newest checkpoint, then remove the older ones."""
        self.directory.mkdir(parents=True, exist_ok=True)
        saved = session.save(self.directory / f"{PREFIX}{session.read_so_far()}")
        mark_latest(self.directory, saved)
        for older in self.directory.glob(f"{PREFIX}*"):
            if older != saved and older.is_dir():
                shutil.rmtree(older)
        self._last_save = time.monotonic()
        return saved

    def due(self) -> bool:
        """Whether ``every_s`` seconds have passed since the last save (or since this was made)."""
        return time.monotonic() - self._last_save >= self.every_s


def announce_resume(session: StreamingSession, saved: Path) -> None:
    """One line on standard error: what a resumed read starts from."""
    print(f"resuming from {saved}: {session.read_so_far():,} tokens already read", file=sys.stderr)
