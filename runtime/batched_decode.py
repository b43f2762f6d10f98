"""Batched decoding: the decode steps of concurrent streams, each over its own nugget cache, in one pass.

Each :class:`~nugget2d.runtime.generation.TokenStream` given a :class:`DecodeBatcher` reads its prompt
alone, then queues every later token (:meth:`DecodeBatcher.request`) and waits. :meth:`DecodeBatcher.run`
then runs one forward pass per batch: the queued streams whose caches can share one
(:func:`~nugget2d.compress.cache_batch.batch_key`: same model, position mode and allocation), up to
``max_batch`` rows, their caches stacked left-padded with masked slots
(:func:`~nugget2d.compress.cache_batch.stack_caches`). A batch stays stacked while the same streams
come back step after step; a stream that leaves takes its own cache back
(:func:`~nugget2d.compress.cache_batch.unstack_row`) and leaves a ghost row, decoded and never read, so
the others go on without a new stack; when a stream joins (or ghosts outnumber the live rows) the
next run stacks the new set, the members of a stack bringing their rows of it
(:func:`~nugget2d.compress.cache_batch.stack_rows`). Each row's
logits go through the stream's own sampling step, so a stream decodes as it would alone.

The server's worker runs a batcher after every turn of its jobs (``nugget2d serve --max-batch``);
:func:`run_together` does the same for a list of generators (batch jobs' questions).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from nugget2d.compress import Nugget2DModel, NuggetCache
from nugget2d.compress.cache_batch import batch_key, stack_rows, unstack_row
from nugget2d.compress.hf_compat import returned_cache

from .generation import GenerationSettings, TokenStream, text_pieces


@dataclass
class _Batch:
    """Streams decoding over one stacked cache: row ``i`` is ``streams[i]``, stacked from ``sources[i]``;
    a row whose stream left is a ghost (``None``): decoded, never read, until the next stack."""

    streams: list[TokenStream | None]
    sources: list[NuggetCache]
    appended: list[int]  # per row, the entries its stream's passes added since ``sources[i]``
    cache: NuggetCache

    @property
    def live(self) -> list[TokenStream]:
        """The streams still in the batch, in row order."""
        return [stream for stream in self.streams if stream is not None]


@dataclass
class BatchStats:
    """What a batcher did: passes run, rows decoded, stacks made and their seconds."""

    passes: int = 0
    rows: int = 0
    stacks: int = 0
    stack_seconds: float = 0.0
    unstack_seconds: float = 0.0
    largest: int = 0
    sizes: list[int] = field(default_factory=list)  # rows of every pass, in order (kept short: last 10,000)


class DecodeBatcher:
    """Runs the queued decode passes of many :class:`TokenStream` s, batched (one worker thread only)."""

    def __init__(
        self,
        model: Nugget2DModel,
        max_batch: int = 8,
        dense: bool = False,
        on_pass: Callable[[int], None] | None = None,
    ) -> None:
        """``max_batch``: rows of one pass at most (1: every stream alone); ``dense``: per-head caches
        read stacked dense (masked slots included) instead of packed; ``on_pass(rows)`` is called after
        every pass."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.max_batch, self.dense, self.on_pass = model, max_batch, dense, on_pass
        self.stats = BatchStats()
        self._queued: dict[TokenStream, None] = {}  # in arrival order
        self._results: dict[TokenStream, torch.Tensor | BaseException] = {}
        self._batch_of: dict[TokenStream, _Batch] = {}
        self._fed: set[TokenStream] = set()  # streams whose pass ran, its result not taken yet
        self._arrival: dict[TokenStream, int] = {}  # order of first requests: rows keep their places
        self._arrivals = 0

    # --- the TokenStream side (StepBatcher) -------------------------------------------------------

    def request(self, stream: TokenStream) -> None:
        """Queue a pass reading ``stream.feeding`` (one token) over the stream's cache."""
        if len(stream.feeding) != 1:
            raise ValueError(f"a batched pass reads one token per stream, got {len(stream.feeding)}")
        self._results.pop(stream, None)
        self._fed.discard(stream)
        self._queued[stream] = None
        if stream not in self._arrival:
            self._arrival[stream], self._arrivals = self._arrivals, self._arrivals + 1

    def result(self, stream: TokenStream) -> torch.Tensor:
        """The logits ``(1, vocab)`` of ``stream``'s pass; raises what its pass raised."""
        try:
            value = self._results.pop(stream)
        except KeyError:
            raise RuntimeError("the stream resumed before DecodeBatcher.run() ran its pass") from None
        self._fed.discard(stream)  # its next token is sampled from these logits, and not fed yet
        if isinstance(value, BaseException):
            raise value
        return value

    def leave(self, stream: TokenStream) -> bool:
        """Drop ``stream`` (queued or batched), its own cache back in ``stream.cache``; True if a pass fed
        its last token and the stream has not taken the result."""
        self._queued.pop(stream, None)
        self._results.pop(stream, None)
        self._release(stream)  # its row stays, a ghost, so the others go on without a new stack
        fed = stream in self._fed
        self._fed.discard(stream)
        self._arrival.pop(stream, None)
        return fed

    # --- the scheduler side --------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Streams whose pass is queued."""
        return len(self._queued)

    @torch.no_grad()
    def run(self) -> None:
        """Run every queued pass: one forward pass per batch. Never raises: a failed pass is raised in
        its streams when they resume."""
        queued, self._queued = list(self._queued), {}
        for chunk in self._plan(queued):
            try:
                self._run_chunk(chunk)
            except Exception as err:  # delivered to each stream, which raises it in its request
                for stream in chunk:
                    self._results[stream] = err
                    batch = self._batch_of.get(stream)
                    if batch is not None:
                        self._dissolve(batch)

    def _plan(self, queued: list[TokenStream]) -> list[list[TokenStream]]:
        """The queued streams in batches: by cache kind, in order of their first request, ``max_batch``
        at most each (a batch already stacked runs on while the same streams come back)."""
        groups: dict[object, list[TokenStream]] = {}
        for stream in sorted(queued, key=self._arrival.__getitem__):
            cache = stream.cache
            key = batch_key(cache) if isinstance(cache, NuggetCache) and cache.batch_size == 1 else None
            groups.setdefault(key if key is not None else stream, []).append(stream)
        return [
            members[start : start + self.max_batch]
            for members in groups.values()
            for start in range(0, len(members), self.max_batch)
        ]

    def _run_chunk(self, chunk: list[TokenStream]) -> None:
        batch = self._batch_of.get(chunk[0])
        if batch is None or batch.live != chunk or len(batch.streams) > 2 * len(chunk):  # new members, or mostly ghosts
            if len(chunk) == 1:
                self._release(chunk[0])
                batch = None
            else:
                batch = self._stack(chunk)
        if batch is None:  # alone: the stream's own cache, as TokenStream reads it
            tokens = torch.tensor([chunk[0].feeding], device=self.model.device)
            out = self.model(tokens, nuggets=chunk[0].cache)
            chunk[0].cache = returned_cache(out)
            rows = [chunk[0]]
        else:  # a ghost row reads any token: its output is never used
            rows = batch.streams
            tokens = torch.tensor([s.feeding if s is not None else [0] for s in rows], device=self.model.device)
            out = self.model(tokens, nuggets=batch.cache)
            batch.cache, batch.appended = returned_cache(out), [count + 1 for count in batch.appended]
        logits = out.logits[:, -1:]
        for row, stream in enumerate(rows):
            if stream is not None:
                self._results[stream] = logits[row]
                self._fed.add(stream)
        self._count(len(chunk))

    def _stack(self, streams: list[TokenStream]) -> _Batch:
        """A new stack of ``streams``: those in a stack already bring their row of it (no copy back to
        their own caches first), the others their own caches; their old rows become ghosts."""
        started = time.perf_counter()
        parts, sources, appended, moved = [], [], [], []
        for stream in streams:
            old = self._batch_of.get(stream)
            if old is None:
                parts.append((stream.cache, 0))
                sources.append(stream.cache)
                appended.append(0)
            else:
                row = old.streams.index(stream)
                parts.append((old.cache, row))
                sources.append(old.sources[row])
                appended.append(old.appended[row])
                moved.append((old, row))
        batch = _Batch(list(streams), sources, appended, stack_rows(parts, dense=self.dense))
        for old, row in moved:
            old.streams[row] = None
        for stream in streams:
            self._batch_of[stream] = batch
        self.stats.stacks += 1
        self.stats.stack_seconds += time.perf_counter() - started
        return batch

    def _release(self, stream: TokenStream) -> None:
        """Take ``stream`` out of its stack (if any), its own cache back; its row becomes a ghost."""
        batch = self._batch_of.pop(stream, None)
        if batch is not None:
            started = time.perf_counter()
            row = batch.streams.index(stream)
            stream.cache = unstack_row(batch.cache, row, batch.sources[row], batch.appended[row])
            batch.streams[row] = None
            self.stats.unstack_seconds += time.perf_counter() - started

    def _dissolve(self, batch: _Batch) -> None:
        """Give each member its own cache back and forget the stack."""
        for stream in batch.live:
            self._release(stream)

    def _count(self, rows: int) -> None:
        stats = self.stats
        stats.passes += 1
        stats.rows += rows
        stats.largest = max(stats.largest, rows)
        stats.sizes.append(rows)
        del stats.sizes[:-10_000]
        if self.on_pass is not None:
            self.on_pass(rows)


def run_together(generators: Sequence[Iterator], batcher: DecodeBatcher) -> list[list | BaseException]:
    """Drive ``generators`` whose streams decode through ``batcher``: each in turn until it waits (yields
    ``None``) or ends, then the batcher's passes, until all end. Returns what each yielded (``None``s
    left out), or the exception it raised."""
    outputs: list[list | BaseException] = [[] for _ in generators]
    running = dict(enumerate(generators))
    while running:
        for index, generator in list(running.items()):
            try:
                while (item := next(generator)) is not None:
                    outputs[index].append(item)
            except StopIteration:
                del running[index]
            except Exception as err:  # this generator's failure, not the others'
                outputs[index] = err
                del running[index]
        batcher.run()
    return outputs


def answer_text(session, question: str, settings: GenerationSettings, batcher: DecodeBatcher) -> Iterator[str | None]:
    """The answer of ``session`` (a :class:`~nugget2d.runtime.session.StreamingSession`) to ``question``
    as text pieces, ``None`` while a batched pass waits (cut at the first stop string, as ``ask``)."""
    prompt = session.prompt_ids(question, settings)
    tokens = session.ask_ids(prompt, settings, question=question, batcher=batcher)  # BM25 reads the question
    yield from text_pieces(tokens, session.tokenizer, settings.stop)


def ask_together(
    sessions: Sequence, questions: Sequence[str], settings: GenerationSettings, max_batch: int = 8
) -> list[str | BaseException]:
    """Each of ``sessions`` asked its question, their decode steps batched ``max_batch`` rows at a time:
    the answers' texts, or the exception a question raised (the others are answered regardless)."""
    if not sessions:
        return []
    batcher = DecodeBatcher(sessions[0].model, max_batch)
    answers = run_together([answer_text(s, q, settings, batcher) for s, q in zip(sessions, questions)], batcher)
    return [a if isinstance(a, BaseException) else "".join(a) for a in answers]
