"""The model worker: one thread owns the model and runs every job, so the event loop never waits on it.

A job is a generator run in the worker. Up to ``slots`` jobs are active at once and advance in
turn, one unit of work each (one token, or one segment of text to compress), so many streams make
progress together; the rest wait in a bounded queue. What a job yields goes to its asyncio queue
(``None`` is a tick that sends nothing). With a decode batcher
(:class:`~nugget2d.runtime.batched_decode.DecodeBatcher`) a job's turn runs until its next tick (its
text so far sent, its next token's pass queued), and after every round of turns the batcher runs the
queued passes: the next token of every decoding job in one forward pass. Without one, a turn is one
``next()`` and each job runs its own passes. A cancelled job is closed at its next turn, which frees
its slot. At shutdown (:meth:`Engine.drain`) the waiting jobs are refused at once with a 503,
while the running ones may finish.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from .errors import APIError
from .metrics import Metrics

_ITEM, _END, _ERROR = "item", "end", "error"
RETRY_AFTER_S = 1  # what a 429 tells clients to wait: a slot frees as soon as any running answer ends
#: Items one turn may send before its job yields a tick (a bound: a job's turn normally ends at its tick).
TURN_ITEMS = 64


class Job:
    """One unit of model work, consumed from the event loop with ``async for``."""

    def __init__(self, factory: Callable[[], Iterator[Any]], loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        self.factory, self.loop, self.deadline = factory, loop, deadline
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.iterator: Iterator[Any] | None = None

    def cancel(self) -> None:
        """Stop the job at its next turn (safe from any thread, any number of times)."""
        self.cancelled.set()

    def _send(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone: nobody is listening
            self.cancel()

    async def __aiter__(self) -> AsyncIterator[Any]:
        """The job's items; raises what the job raised, or ``APIError(503)`` past the deadline.
        Leaving the loop early (client gone, error) cancels the job."""
        try:
            while True:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise _timed_out()
                try:
                    kind, value = await asyncio.wait_for(self.events.get(), timeout=left)
                except asyncio.TimeoutError:
                    continue
                if kind == _END:
                    return
                if kind == _ERROR:
                    raise value
                yield value
        finally:
            self.cancel()


class Engine:
    """Runs jobs on one worker thread, interleaving up to ``slots`` of them; a ``batcher`` (set before
    :meth:`start`) runs their queued decode passes after every round."""

    def __init__(self, slots: int, max_queue: int, timeout_s: float, metrics: Metrics, batcher=None) -> None:
        self.slots, self.max_queue, self.timeout_s, self.metrics = slots, max_queue, timeout_s, metrics
        self.batcher = batcher
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []
        self.wake = threading.Condition()
        self.running = False
        self.draining = False  # set by drain(): no new jobs, the waiting ones refused
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker thread."""
        self.running = True
        self.thread = threading.Thread(target=self._work, name="nugget2d-model-worker", daemon=True)
        self.thread.start()

    def drain(self) -> None:
        """Begin shutting down: refuse new jobs and answer the waiting ones 503 at the worker's next
        turn; running jobs go on. Takes no lock, so a signal handler may call it."""
        self.draining = True

    def stop(self) -> None:
        """Cancel every job and stop the worker."""
        with self.wake:
            self.running = False
            for job in list(self.waiting) + self.active:
                job.cancel()
            self.wake.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        """True while the worker thread runs and takes new jobs."""
        return self.running and not self.draining and self.thread is not None and self.thread.is_alive()

    def submit(self, factory: Callable[[], Iterator[Any]]) -> Job:
        """Queue a job (call from the event loop); ``APIError`` 429 when the queue is full, 503 when stopped."""
        if self.draining:
            raise _shutting_down()
        if not self.alive:
            raise APIError(503, "the model worker is not running", code="unavailable")
        job = Job(factory, asyncio.get_running_loop(), time.monotonic() + self.timeout_s)
        with self.wake:
            busy = len(self.active) >= self.slots
            if busy and len(self.waiting) >= self.max_queue:
                raise APIError(
                    429,
                    f"the server is busy ({len(self.active)} running, {len(self.waiting)} waiting); retry later",
                    code="queue_full",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            self.waiting.append(job)
            self._report()
            self.wake.notify()
        return job

    def _report(self) -> None:
        self.metrics.queue_depth.set(len(self.waiting))
        self.metrics.active.set(len(self.active))

    def _work(self) -> None:
        while True:
            with self.wake:
                while self.running and not self.active and not self.waiting:
                    self.wake.wait()
                if not self.running:
                    break
                while self.draining and self.waiting:
                    self._close(self.waiting.popleft(), _shutting_down())
                while self.waiting and len(self.active) < self.slots:
                    self.active.append(self.waiting.popleft())
                self._report()
                turn = list(self.active)
            for job in turn:
                if not self._step(job):
                    with self.wake:
                        self.active.remove(job)
                        self._report()
            if self.batcher is not None:
                self.batcher.run()  # never raises: a failed pass fails its jobs when they resume
        with self.wake:
            left, self.active = [*self.active, *self.waiting], []
            self.waiting.clear()
            self._report()
        for job in left:  # the waiting ones too, so none waits for its deadline
            self._close(job)

    def _step(self, job: Job) -> bool:
        """Give ``job`` its turn: one item, or with a batcher items up to its next tick; False once it is finished."""
        if job.cancelled.is_set():
            self._close(job)
            return False
        if time.monotonic() > job.deadline:
            self._close(job, _timed_out())
            return False
        for _ in range(TURN_ITEMS if self.batcher is not None else 1):
            try:
                if job.iterator is None:
                    job.iterator = iter(job.factory())
                item = next(job.iterator)
            except StopIteration:
                job._send(_END, None)
                return False
            except Exception as err:  # delivered to the request, which turns it into an error response
                job._send(_ERROR, err)
                return False
            if item is None:
                break
            job._send(_ITEM, item)
        return True

    def _close(self, job: Job, reason: APIError | None = None) -> None:
        """Close ``job``'s iterator and tell its request why: ``reason``, or that it was cancelled."""
        if job.iterator is not None and hasattr(job.iterator, "close"):
            try:
                job.iterator.close()
            except Exception:  # closing a cancelled job must never stop the worker
                pass
        job._send(_ERROR, reason or APIError(503, "the request was cancelled", code="cancelled"))


def _shutting_down() -> APIError:
    """What a request that cannot run before the server stops answers."""
    return APIError(503, "the server is shutting down; retry on another replica or later", code="shutting_down")


def _timed_out() -> APIError:
    """What a request past its deadline answers."""
    return APIError(503, "the request timed out on the server", code="timeout")
