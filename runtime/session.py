"""A streaming session: read a text of any length into a bounded cache, then ask about it.

The cache has three parts inside one budget (``docs/design.md``): the first ``sinks`` tokens raw,
entries kept by the cache policy from the far past, and the last ``recent`` tokens raw. Text is read
``segment`` tokens at a time (by the encoder adapter when the policy asks for it), attending to the
cache so far; as tokens leave the raw window the policy keeps ``ceil(n·ratio)`` of them
(:mod:`nugget2d.compress.policies`), and :class:`~nugget2d.runtime.cache_budget.BudgetKeeping` keeps
the whole inside the budget. With ``positions="cache"`` a token's position is the number of entries
before it and moved keys are re-rotated, so no position ever reaches the model's native window;
``original`` keeps text positions (texts inside the window); ``auto`` keeps text positions in a
per-head cache until the text outgrows the window, then renumbers it as ``cache``.
Longer than ~400 lines because reading, asking, forking and saving share one session's state; keeping
the budget is in ``cache_budget.py``, look-back in ``lookback.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import sys
import time
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from nugget2d.compress import Nugget2DModel, NuggetCache
from nugget2d.compress.hf_compat import returned_cache
from nugget2d.compress.rope import check_rerotatable

from .cache_budget import BudgetKeeping
from .cache_config import ANSWER_FIELDS, POSITIONS, CacheConfig
from .chat import ChatFormat
from .generation import GenerationSettings, Scoring, StepBatcher, TokenStream, text_pieces, token_log_probs
from .lookback import IDS_FILE, LookBack, LookBackStats, ask_looking_back, load_ids, resolve, save_ids
from .resources import peak_rss_bytes
from .session_stats import SessionStats
from .texts import file_chunks, token_chunks

#: The name cache configurations had before :class:`CacheConfig` (same fields, same validation).
StreamSettings = CacheConfig
__all__ = ["POSITIONS", "CacheConfig", "SessionStats", "StreamSettings", "StreamingSession", "start_ids"]


class Checkpoint(Protocol):
    """What saves a session while it reads (:class:`~nugget2d.runtime.read_checkpoint.ReadCheckpoint`)."""

    def due(self) -> bool: ...

    def save(self, session: StreamingSession) -> Path: ...


class StreamingSession(BudgetKeeping):
    """One document (or stream) in a bounded nugget cache, asked any number of questions."""

    def __init__(
        self,
        model: Nugget2DModel,
        tokenizer,
        settings: CacheConfig | None = None,
        chat: bool = True,
        progress: bool = False,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        #: the configuration with the adapter's ratio and the allocation filled in
        self.settings = (settings or CacheConfig()).for_model(model)
        #: what stays of the text leaving the raw window (``settings.policy``, per head when so allocated)
        self.policy = self.settings.make_policy()
        if self.settings.positions != "original":
            check_rerotatable(model.rotary_emb)
        self.window = int(model.base.config.max_position_embeddings)
        self.format = ChatFormat.from_tokenizer(tokenizer) if chat else ChatFormat.plain()
        self.progress = progress
        allocation = self.settings.allocation
        self.cache = model.new_cache(positions=self._first_positions(allocation), allocation=allocation)
        #: per layer ``(B, Hkv, entries)``: the attention the last segment's last queries gave each entry
        #: (per-head caches with an observation window), until the cache next changes
        self.observed: list[torch.Tensor] | None = None
        self.sinks = self.nuggets = self.raw = 0  # entries per part: [sinks][nuggets][raw], one row
        self.pending: list[int] = []  # sampled by the last answer, not yet in the cache
        self._waiting: list[int] = []  # read but not yet a full segment
        self._started = False
        self._start_count = 0  # start tokens (template, BOS) this session put before the input
        self._progress_bar = None  # while ingest() shows progress: advanced by every segment encoded
        self._checkpoint: Checkpoint | None = None  # while ingest() saves the session as it reads
        self.turns = 0
        self.stats = SessionStats()
        #: every token id the cache has read, in order (index = text position); None for a session saved
        #: before sessions kept them (look-back is then unavailable)
        self.token_ids: array | None = array("i")
        self.lookback_stats = LookBackStats()

    @property
    def look_back(self) -> LookBack:
        """What a question reads back by default: ``settings.lookback`` tokens, read where
        ``settings.lookback_placement`` says (:mod:`.lookback`)."""
        return LookBack(self.settings.lookback, placement=self.settings.lookback_placement)

    @property
    def allocation(self) -> str:
        """``token`` or ``head``: how this session's cache spends its nugget budget."""
        return self.cache.allocation

    def _first_positions(self, allocation: str) -> str:
        """How a new cache is numbered: ``auto`` starts a per-head cache with text positions (each head's
        entries keep their distances: measured better inside the window) and a token-level one with
        cache positions."""
        if self.settings.positions != "auto":
            return self.settings.positions
        return "original" if allocation == "head" else "cache"

    # --- reading ---------------------------------------------------------------------------------

    def ingest(
        self, source: str | Path | Iterable[str], checkpoint: Checkpoint | None = None, resume: bool = False
    ) -> int:
        """Read a string, a text file (``Path``) or an iterator of text chunks; return tokens read.
        ``checkpoint`` saves the session every few minutes while it reads; ``resume`` (a session loaded
        from one) skips the start of ``source`` it has already read, after checking it is the same text.

        Bad input (missing, empty or binary file) raises ``ValueError`` before anything is read.
        """
        if isinstance(source, Path):
            pieces = functools.partial(file_chunks, source)
        elif isinstance(source, str):
            if not source.strip():
                raise ValueError("the text is empty")
            pieces = functools.partial(_pieces, source)
        else:
            pieces = None
        total, done = None, self.read_so_far() if resume else 0
        if pieces is not None and self.progress:  # a first, fast pass: the bar counts tokens and shows what is left
            total = sum(len(ids) for ids in token_chunks(self.tokenizer, pieces()))
            total += 0 if self._started else len(self._start_ids())
        before = self.stats.tokens_ingested
        chunks = token_chunks(self.tokenizer, pieces() if pieces is not None else source)
        with tqdm(
            total=total,
            initial=done,
            unit="tok",
            unit_scale=True,
            desc="ingest",
            file=sys.stderr,
            disable=not self.progress,
        ) as bar:
            self._progress_bar, self._checkpoint = bar, checkpoint
            try:
                for ids in self._skip_read(chunks) if resume else chunks:
                    self.ingest_ids(ids, final=False)
                self.ingest_ids([], final=True)
            finally:
                self._progress_bar = self._checkpoint = None
        read = self.stats.tokens_ingested - before
        if read == 0 and not (resume and done):
            raise ValueError("the text is empty (no tokens)")
        if checkpoint is not None:
            checkpoint.save(self)
        return read

    @torch.no_grad()
    def ingest_ids(self, ids: Iterable[int], final: bool = True) -> None:
        """Encode token ids into the cache in segments of ``segment`` tokens, whatever the sizes of
        the calls; a shorter last segment is encoded when ``final``, otherwise it waits for more."""
        ids = [int(t) for t in ids]
        if ids and not self._started:
            start = self._start_ids()
            ids, self._started, self._start_count = start + ids, True, len(start)
        self._waiting.extend(ids)
        size = self.settings.segment
        started = time.perf_counter()
        while len(self._waiting) >= size or (final and self._waiting):
            segment, self._waiting = self._waiting[:size], self._waiting[size:]
            began = time.perf_counter()
            self._encode_segment(segment)
            self.stats.note_segment(len(segment), time.perf_counter() - began, self.cache)
            if self._progress_bar is not None:
                self._progress_bar.update(len(segment))
            if self._checkpoint is not None and self._checkpoint.due():
                self.stats.ingest_seconds += time.perf_counter() - started
                started = time.perf_counter()
                self._checkpoint.save(self)
        self.stats.ingest_seconds += time.perf_counter() - started
        self._refresh_stats()

    def read_so_far(self) -> int:
        """Tokens of the input taken in (encoded or waiting for a full segment), the start tokens (chat
        template, BOS) not counted: where a resumed read goes on from."""
        return len(self.token_ids) - self._started_with() + len(self._waiting)

    def _skip_read(self, chunks: Iterable[list[int]]) -> Iterator[list[int]]:
        """The token chunks of the input after what this session has already read of it; ``ValueError``
        when the input does not start with that text (a checkpoint of another input)."""
        done = list(self.token_ids[self._started_with() :]) + list(self._waiting)
        offset = 0
        for ids in chunks:
            if offset >= len(done):
                yield ids
                continue
            overlap = ids[: len(done) - offset]
            if overlap != done[offset : offset + len(overlap)]:
                first = next(i for i, (a, b) in enumerate(zip(overlap, done[offset:])) if a != b)
                raise ValueError(
                    f"the checkpoint read another text: the input's token {offset + first} differs from the one "
                    "read then; resume with the same --input, or start a new --checkpoint directory"
                )
            offset += len(overlap)
            if len(ids) > len(overlap):
                yield ids[len(overlap) :]
        if offset < len(done):
            raise ValueError(
                f"the input has {offset} tokens, fewer than the {len(done)} the checkpoint already read; resume "
                "with the same --input, or start a new --checkpoint directory"
            )

    def _start_ids(self) -> list[int]:
        return start_ids(self.tokenizer, self.format)

    def _started_with(self) -> int:
        """How many of :attr:`token_ids` are the start tokens this session put before the input (none
        after :meth:`ingest_formatted`, whose caller put in its own)."""
        return self._start_count

    def opening_length(self) -> int:
        """How many of :attr:`token_ids` open the text (what look-back's ``alone`` placement reads before its
        spans): the start tokens this session put in; for ids put in by the caller
        (:meth:`ingest_formatted`), as many as begin like this model's chat template start; at least the
        sinks."""
        if self._start_count:
            return self._start_count
        start = start_ids(self.tokenizer, ChatFormat.from_tokenizer(self.tokenizer))
        read = self.token_ids[: len(start)] if self.token_ids is not None else []
        same = next((i for i, (a, b) in enumerate(zip(read, start)) if a != b), min(len(read), len(start)))
        return max(same, self.sinks)

    def _encode_segment(self, ids: list[int]) -> None:
        self._check_original_positions(len(ids))
        settings = self.settings
        held = self.sinks + self.nuggets + self.raw
        # Streaming compresses what leaves the raw window before every segment; with a read budget the
        # text stays whole until the next segment would overflow it, then shrinks into the budget.
        if settings.read_budget is None or held + len(ids) > settings.read_capacity:
            self._make_room(max(0, len(ids) - (settings.read_capacity - settings.budget)), keep_raw=settings.recent)
        observer = self.policy.observer()
        # policies that keep no nuggets (the baselines of the unmodified model) keep its own K/V
        self.model.encode(
            torch.tensor([ids], device=self.model.device),
            cache=self.cache,
            frozen=not self.policy.reads_with_encoder,
            observer=observer,
            surprise=self.policy.wants_surprise,
        )
        if observer is not None:
            record = self.policy.after_read(self.cache, observer, len(ids))
            if record is not None:
                self.observed = record
        self.stats.encoder_calls += 1
        self.stats.tokens_ingested += len(ids)
        self._append_raw(len(ids))
        self._note_read(ids)

    def _note_read(self, ids: list[int]) -> None:
        if self.token_ids is not None:
            self.token_ids.extend(ids)

    def _append_raw(self, count: int) -> None:
        """Count ``count`` entries just appended: the stream's first tokens fill the sinks."""
        as_sinks = min(count, self.settings.sinks - self.sinks) if self.nuggets == self.raw == 0 else 0
        self.sinks += as_sinks
        self.raw += count - as_sinks

    # --- asking ----------------------------------------------------------------------------------

    def ask(
        self, question: str, settings: GenerationSettings | None = None, lookback: int | LookBack | None = None
    ) -> Iterator[str]:
        """Stream the answer to ``question`` as text pieces; the exchange stays in the session (with
        look-back it does not: see :meth:`ask_ids`)."""
        settings = settings or GenerationSettings()
        prompt = self.prompt_ids(question, settings)
        yield from text_pieces(
            self.ask_ids(prompt, settings, lookback=lookback, question=question), self.tokenizer, settings.stop
        )

    def prompt_ids(self, question: str, settings: GenerationSettings) -> list[int]:
        """Token ids that ask ``question`` next; ``ValueError`` if empty or too long for the budget."""
        if not question.strip():
            raise ValueError("the question is empty")
        ids = self.tokenizer(self.format.question(question, self.turns == 0), add_special_tokens=False).input_ids
        self._check_fits(len(self.pending) + len(ids), settings)
        return ids

    def _check_fits(self, prompt_tokens: int, settings: GenerationSettings) -> None:
        if self.settings.sinks + prompt_tokens + settings.max_new_tokens > self.settings.budget:
            raise ValueError(
                f"the prompt ({prompt_tokens} tokens) plus max_new_tokens ({settings.max_new_tokens}) does not fit the "
                f"cache budget ({self.settings.budget} entries, {self.settings.sinks} of them sinks); shorten the "
                "prompt, lower max_new_tokens or raise the budget"
            )

    def ask_ids(
        self,
        prompt_ids: Iterable[int],
        settings: GenerationSettings | None = None,
        scoring: Scoring | None = None,
        lookback: int | LookBack | None = None,
        question: str | None = None,
        batcher: StepBatcher | None = None,
    ) -> Iterator[int | None]:
        """Stream new token ids after ``prompt_ids``; closing the iterator early keeps the session usable.
        A ``scoring`` records the log-probabilities of the new tokens (and of ``prompt_ids`` when it asks);
        with a ``batcher`` they are decoded together with other streams', ``None`` yielded while a pass
        waits (:class:`~nugget2d.runtime.generation.TokenStream`).

        ``lookback`` (tokens, or a :class:`~nugget2d.runtime.lookback.LookBack`; default
        :attr:`look_back`, from ``settings.lookback``): passages chosen for this question are read raw
        before it, and the turn is answered on a copy, so the session (its cache, pending tokens and turn
        count) stays as it was before the question. ``question``: its text, for the BM25 selector (the
        prompt's decoded text otherwise). ``ValueError`` for a negative look-back, or a look-back on a
        session saved without token ids."""
        settings = settings or GenerationSettings()
        look = self._look_back(lookback)
        if look.tokens:
            yield from ask_looking_back(self, [int(t) for t in prompt_ids], settings, scoring, look, question, batcher)
            return
        self.ingest_ids([], final=True)
        prompt = self.pending + [int(t) for t in prompt_ids]
        self._check_fits(len(prompt), settings)
        self._open_turn(len(prompt) + settings.max_new_tokens)
        stream = TokenStream(self.model, self.cache, prompt, settings, self._eos_ids(), scoring, batcher)
        started = time.perf_counter()
        try:
            yield from stream
        finally:
            self.turns += 1
            self.stats.generated_tokens += len(stream.generated)
            self._close_turn(stream.cache, stream.unfed, len(prompt), started, prompt + stream.generated)

    def answer_with(self, settings: CacheConfig) -> None:
        """Answer from now on with the look-back of ``settings`` (its :data:`ANSWER_FIELDS`), which does not
        change what the session has read (a saved session asked with other flags)."""
        self.settings = dataclasses.replace(self.settings, **{name: getattr(settings, name) for name in ANSWER_FIELDS})

    def _look_back(self, lookback: int | LookBack | None) -> LookBack:
        """The look-back of one question: the session's, ``lookback`` tokens of it, or as given."""
        return resolve(self.look_back, lookback, self.token_ids is not None)

    def _eos_ids(self) -> list[int]:
        return eos_ids(self.tokenizer, self.model.base)

    def score_ids(self, ids: Iterable[int], room: int = 0) -> torch.Tensor:
        """Log-probabilities ``(len(ids) - 1,)`` of ``ids[1:]``, each given the stream so far and the ids
        before it (teacher forcing: one forward pass over the cache, made room for like a prompt); the
        ids then stay in the cache. ``room`` (at least the ids' count) is how many entries are freed
        first, so scorings of different lengths can see one stream in the same number of entries.
        ``ValueError`` for fewer than two ids or more than the budget holds."""
        ids = [int(t) for t in ids]
        if len(ids) < 2:
            raise ValueError(f"score_ids needs at least two ids (an opener and a token to score), got {len(ids)}")
        self.ingest_ids([], final=True)
        prompt = self.pending + ids
        needed = max(len(prompt), room)
        if self.settings.sinks + needed > self.settings.budget:
            raise ValueError(
                f"{needed} entries to score do not fit the cache budget ({self.settings.budget} entries, "
                f"{self.settings.sinks} of them sinks); score fewer or raise the budget"
            )
        started = time.perf_counter()
        self._open_turn(needed, fed=len(prompt))
        with torch.no_grad():
            out = self.model(torch.tensor([prompt], device=self.model.device), nuggets=self.cache)
        scored = token_log_probs(out.logits[0, len(self.pending) : -1], ids[1:])
        self._close_turn(returned_cache(out), [], len(prompt), started, prompt)
        return scored

    def _open_turn(self, needed: int, fed: int | None = None) -> None:
        """Before a question or a scoring: free the cache for ``needed`` entries, of which ``fed`` (all,
        by default) will be fed, keeping only the ``recent`` window raw."""
        self._check_original_positions(needed if fed is None else fed)
        with torch.no_grad():
            self._make_room(needed, keep_raw=self._raw_when_asked(needed))

    def _close_turn(
        self, cache: NuggetCache, pending: list[int], prompt_tokens: int, started: float, sent: list[int]
    ) -> None:
        """After a question or a scoring: adopt the ``cache`` it grew (its new entries, the first of the
        ``sent`` ids, count as raw), keep the ids it left ``pending``, and count its time. The attention
        record is dropped: it described the entries before the turn."""
        fed = cache.get_seq_length() - self.cache.get_seq_length()
        self.cache, self.pending, self.observed = cache, pending, None
        self._append_raw(fed)
        self._note_read(sent[:fed])
        self.stats.prompt_tokens += prompt_tokens
        self.stats.decode_seconds += time.perf_counter() - started
        self._refresh_stats()

    def keeps_text_positions(self, incoming: int) -> bool:
        """Whether the cache is numbered by text position and stays so after ``incoming`` more tokens
        (they fit the model's window)."""
        return self.cache.position_mode == "original" and self.cache.tokens_read() + incoming <= self.window

    def _check_original_positions(self, incoming: int) -> None:
        """Before ``incoming`` tokens: with text positions past the model's window, ``auto`` renumbers the
        cache by entries (keys re-rotated) from here on; ``original`` refuses."""
        if self.cache.position_mode != "original" or self.keeps_text_positions(incoming):
            return
        if self.settings.positions == "auto":
            self.cache.position_mode = "cache"
            if self.cache.batch_size:
                self.cache.reposition(self.model.rotary_emb)
        else:
            raise ValueError(
                f"positions='original' keeps text positions, and {self.cache.tokens_read() + incoming} tokens exceed "
                f"the model's native window ({self.window}); use positions='auto' or 'cache' for longer texts"
            )

    def _refresh_stats(self) -> None:
        stats = self.stats
        stats.cache_tokens = int(self.cache.entry_counts()[0]) if self.cache.batch_size else 0
        stats.nugget_tokens = self.nuggets
        stats.cache_bytes = self.cache.nbytes
        total = stats.tokens_ingested + stats.prompt_tokens + stats.generated_tokens
        stats.full_kv_bytes = self.model.full_kv_bytes(total)
        stats.peak_rss_bytes = peak_rss_bytes()

    # --- copies and files (a server keeps documents as sessions) ------------------------------------

    def ingest_formatted(self, ids: Iterable[int], final: bool = True) -> None:
        """:meth:`ingest_ids` with no start tokens added (the caller already put in its own BOS or
        template text)."""
        self._started = True
        self.ingest_ids(ids, final=final)

    def fork(self) -> StreamingSession:
        """A copy to ask questions of; nothing done to the copy changes this session (the cache's
        tensors are shared and never modified in place)."""
        twin = copy.copy(self)
        twin.cache = self.cache.fork()
        twin.pending, twin._waiting = list(self.pending), list(self._waiting)
        twin.stats = dataclasses.replace(self.stats)
        twin.token_ids = array("i", self.token_ids) if self.token_ids is not None else None
        twin.lookback_stats = dataclasses.replace(self.lookback_stats, last_spans=list(self.lookback_stats.last_spans))
        return twin

    def save(self, directory: str | Path) -> Path:
        """Write the session (cache, settings, template pieces, counters) into ``directory``;
        :meth:`load` reads it back into a session that answers exactly as this one."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.cache.save(directory / "cache.safetensors")
        save_ids(self.token_ids, directory / IDS_FILE)
        observed = directory / "observed.safetensors"
        if self.observed is not None:
            save_file({str(i): seen.contiguous() for i, seen in enumerate(self.observed)}, observed)
        else:
            observed.unlink(missing_ok=True)
        state = {
            "settings": asdict(self.settings),
            "format": asdict(self.format),
            "parts": [self.sinks, self.nuggets, self.raw],
            "pending": self.pending,
            "waiting": self._waiting,
            "started": self._started,
            "start_tokens": self._start_count,
            "turns": self.turns,
            "stats": asdict(self.stats),
        }
        (directory / "session.json").write_text(json.dumps(state))
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: Nugget2DModel, tokenizer) -> StreamingSession:
        """Read a session written by :meth:`save`; ``ValueError`` if it is damaged or was built by
        another model."""
        directory = Path(directory)
        try:
            state = json.loads((directory / "session.json").read_text())
            session = cls(model, tokenizer, StreamSettings(**state["settings"]), chat=False)
            session.format = ChatFormat(**state["format"])
            session.sinks, session.nuggets, session.raw = (int(n) for n in state["parts"])
            session.pending, session._waiting = list(state["pending"]), list(state["waiting"])
            session._started, session.turns = bool(state["started"]), int(state["turns"])
            started_with = len(session._start_ids()) if session._started else 0  # saved before it was counted
            session._start_count = int(state.get("start_tokens", started_with))
            session.stats = SessionStats(**state["stats"])
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"{directory} does not hold a readable saved session: {err}") from err
        session.cache = NuggetCache.load(directory / "cache.safetensors", device=model.device)
        session.cache.check_model(model.fingerprint)
        session.token_ids = load_ids(directory / IDS_FILE, session.cache)
        observed = directory / "observed.safetensors"
        if observed.is_file():
            seen = load_file(observed, device=str(model.device))
            session.observed = [seen[str(i)] for i in range(len(seen))]
        return session


def eos_ids(tokenizer, base_model) -> list[int]:
    """Ids that end an answer: the tokenizer's EOS and the model's generation config's."""
    generation = getattr(base_model, "generation_config", None)
    extra = getattr(generation, "eos_token_id", None) if generation is not None else None
    extra = extra if isinstance(extra, list) else [extra]
    return [t for t in [tokenizer.eos_token_id, *extra] if t is not None]


def start_ids(tokenizer, chat_format: ChatFormat) -> list[int]:
    """Tokens that open a stream: the chat template's text before the document, or BOS (when the
    tokenizer itself starts texts with it), or nothing."""
    if chat_format.document_prefix:
        return tokenizer(chat_format.document_prefix, add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    probe = tokenizer("a").input_ids
    return [bos] if bos is not None and probe and probe[0] == bos else []


def _pieces(text: str, size: int = 1 << 16) -> Iterator[str]:
    for begin in range(0, len(text), size):
        yield text[begin : begin + size]
