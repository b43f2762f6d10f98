"""One writer per output file: the lock a batch job holds while it writes.

``OUTPUT.lock`` names the holder (pid, host, start time), and the holder keeps an ``flock`` on it
for as long as it runs, so the kernel frees it the moment that process dies. A second job refuses
to start while the lock is held. A lock file left by a job that died is taken over when its pid no
longer runs on this host; one from another host is refused (this host cannot tell whether that job
still runs) until someone who knows deletes it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path


class OutputLock:
    """The lock on one output file; use as a context manager around everything that writes it."""

    def __init__(self, output: str | Path) -> None:
        self.output = Path(output)
        self.path = self.output.with_name(self.output.name + ".lock")
        self.note: str | None = None  # set when a dead job's lock was taken over
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise ``ValueError`` naming the job that holds it and what to do."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = self._lock_fd()
        except OSError as err:
            raise ValueError(
                f"cannot create the lock file {self.path} ({err.strerror}); give an --output in a folder you can "
                "write to"
            ) from None
        try:
            holder = _read_holder(fd)
            if holder is not None:  # a lock file whose job did not remove it: dead, or on another host
                refusal = self._refusal(holder)
                if refusal:
                    raise ValueError(refusal)
                self.note = (
                    f"took over the lock {self.path} left by pid {holder.get('pid')} on {holder.get('host')}, "
                    "which no longer runs"
                )
            me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file (while still holding it), then let go."""
        if self._fd is None:
            return
        try:
            if _same_file(self._fd, self.path):
                os.unlink(self.path)
        finally:
            os.close(self._fd)
            self._fd = None

    def _lock_fd(self) -> int:
        """An open descriptor of the lock file, ``flock``-ed by this process."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd) or {}
                os.close(fd)
                raise ValueError(
                    f"output {self.output} is being written by another job (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, since {holder.get('started')}); wait for it to finish or give "
                    "another --output"
                ) from None
            if _same_file(fd, self.path):
                return fd
            os.close(fd)  # its holder removed that file as we opened it: lock the one there now

    def _refusal(self, holder: dict) -> str | None:
        """Why a lock file nobody holds may not be taken over (``None``: its job is dead)."""
        pid, host = holder.get("pid"), holder.get("host")
        if host != socket.gethostname():
            return (
                f"output {self.output} is locked by pid {pid} on host {host} (lock file {self.path}); this host "
                "cannot tell whether that job still runs: if it does, wait for it; if it is gone, delete the lock file"
            )
        if type(pid) is int and pid > 0 and pid != os.getpid() and _running(pid):
            return (
                f"output {self.output} is locked by pid {pid} on this host, which still runs (lock file "
                f"{self.path}); if that process is not a nugget2d job writing this output, delete the lock file"
            )
        return None


def _read_holder(fd: int) -> dict | None:
    """What a lock file says about its holder (``None`` for an empty file)."""
    data = os.pread(fd, 4096, 0)
    if not data.strip():
        return None
    try:
        holder = json.loads(data)
    except ValueError:
        holder = None
    return holder if isinstance(holder, dict) else {"pid": "unknown", "host": "unknown"}


def _same_file(fd: int, path: Path) -> bool:
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (here.st_dev, here.st_ino)


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process on this host (a zombie is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"
