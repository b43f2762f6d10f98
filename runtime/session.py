"""A streaming session: read a text of any length into a bounded nugget cache, then ask about it.

The cache has three parts inside one budget (DESIGN §4): the first ``sinks`` tokens raw, nuggets
of the far past, and the last ``recent`` tokens raw. Text is encoded ``segment`` tokens at a
time by the encoder adapter, attending to the cache so far; as tokens leave the raw window the
scorer's top ``ceil(n·ratio)`` of them stay as nuggets. When the nuggets outgrow their room the
lowest-scoring are evicted, or the oldest are selected again (``overflow="recompress"``). With
``positions="cache"`` a token's position is the number of entries before it and moved keys are
re-rotated, so no position ever reaches the model's native window; ``original`` keeps text
positions (texts inside the window); ``auto`` keeps text positions in a per-head cache until the
text outgrows the window, then renumbers it as ``cache`` (token-level caches: ``cache`` throughout).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from nugget2d.compress import Nugget2DModel, NuggetCache, nugget_count
from nugget2d.compress.config import check_ratio
from nugget2d.compress.hf_compat import returned_cache
from nugget2d.compress.rope import check_rerotatable

from .cache_policies import (
    OBSERVATION_WINDOW,
    AttentionReceived,
    HeadAttentionReceived,
    accumulate_attention,
    check_policy,
    pool_groups,
    topk_in_order,
)
from .chat import ChatFormat
from .generation import GenerationSettings, Scoring, TextDeltas, TokenStream, token_log_probs
from .resources import peak_rss_bytes
from .texts import file_chunks, token_chunks

#: How a session numbers its cache (:attr:`StreamSettings.positions`).
POSITIONS = ("auto", "cache", "original")


@dataclass
class StreamSettings:
    """The cache's shape: total ``budget`` of entries, of which ``sinks`` first tokens and the
    ``recent`` last tokens stay raw; text is read ``segment`` tokens at a time. ``policy`` decides
    what the tokens leaving the raw window become (:mod:`~nugget2d.runtime.cache_policies`):
    nuggets (``nugget2d``), nothing (``streaming``), top tokens by attention received (``snapkv``)
    or mean-pooled groups (``compressive``). ``allocation`` spreads the nuggets' budget per token
    (every layer and head keeps the same tokens) or per (layer, KV head) by a per-head scorer;
    ``auto`` takes ``head`` when the adapter's scorer scores heads, ``token`` otherwise.
    In a per-head cache the attention that the last ``observation_window`` queries of each segment read
    give every entry votes beside the scorer on what stays: an entry's worth is the better of its two
    percentiles (SnapKV's signal serves continuation, the scorer's far recall); 0: the scorer alone.
    ``read_budget`` (``None``: ``budget``) is how many entries the cache may hold while reading: a text
    that fits is read with full attention and compressed into ``budget`` only when asked (how the
    Nugget2D paper encodes and how KV presses prefill); memory then peaks at ``read_budget``."""

    ratio: float = 0.1
    budget: int = 2048
    recent: int = 512
    segment: int = 256
    sinks: int = 4
    overflow: Literal["evict", "recompress"] = "evict"
    positions: Literal["auto", "cache", "original"] = "auto"
    policy: Literal["nugget2d", "streaming", "snapkv", "compressive"] = "nugget2d"
    allocation: Literal["auto", "token", "head"] = "auto"
    observation_window: int = OBSERVATION_WINDOW
    read_budget: int | None = None

    @property
    def read_capacity(self) -> int:
        """Entries the cache may hold while reading: ``read_budget``, never below ``budget``."""
        return max(self.budget, self.read_budget or 0)

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        check_policy(self.policy)
        for name in ("budget", "segment"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("recent", "sinks", "observation_window"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.overflow not in ("evict", "recompress"):
            raise ValueError(f"overflow must be 'evict' or 'recompress', got {self.overflow!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {list(POSITIONS)}, got {self.positions!r}")
        if self.allocation not in ("auto", "token", "head"):
            raise ValueError(f"allocation must be 'auto', 'token' or 'head', got {self.allocation!r}")
        if self.allocation == "head" and (self.policy != "nugget2d" or self.overflow != "evict"):
            raise ValueError(
                "allocation='head' spreads the nugget2d scorer's per-head scores, evicting the lowest: it needs "
                "policy='nugget2d' and overflow='evict'"
            )
        if self.read_budget is not None and self.read_budget < self.budget:
            raise ValueError(
                f"read_budget ({self.read_budget}) cannot be below budget ({self.budget}): it is what the cache may "
                "hold while reading; raise --read-budget or leave it out"
            )
        floor = self.sinks + self.recent + self.segment
        if self.read_capacity <= floor:
            name = "read_budget" if self.read_capacity > self.budget else "budget"
            raise ValueError(
                f"{name} ({self.read_capacity}) must exceed sinks + recent + segment ({self.sinks} + {self.recent} + "
                f"{self.segment} = {floor}) to leave room for nuggets; raise --budget or lower --recent/--segment"
            )
        if self.budget <= self.sinks + self.recent:
            raise ValueError(
                f"budget ({self.budget}) must exceed sinks + recent ({self.sinks} + {self.recent}) to leave room for "
                "nuggets; raise --budget or lower --recent"
            )


@dataclass
class SessionStats:
    """Counters a caller reports: sizes in tokens and bytes, rates, peak memory."""

    tokens_ingested: int = 0
    encoder_calls: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ingest_seconds: float = 0.0
    decode_seconds: float = 0.0
    cache_tokens: int = 0
    nugget_tokens: int = 0
    cache_bytes: int = 0
    full_kv_bytes: int = 0
    peak_rss_bytes: int = 0

    @property
    def ingest_tokens_per_s(self) -> float:
        return self.tokens_ingested / self.ingest_seconds if self.ingest_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def to_dict(self) -> dict[str, float]:
        """All counters plus the derived rates, JSON-ready."""
        data = asdict(self)
        data.update(ingest_tokens_per_s=self.ingest_tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s)
        return data


class StreamingSession:
    """One document (or stream) in a bounded nugget cache, asked any number of questions."""

    def __init__(
        self,
        model: Nugget2DModel,
        tokenizer,
        settings: StreamSettings | None = None,
        chat: bool = True,
        progress: bool = False,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.settings = settings or StreamSettings()
        if self.settings.positions != "original":
            check_rerotatable(model.rotary_emb)
        self.window = int(model.base.config.max_position_embeddings)
        self.format = ChatFormat.from_tokenizer(tokenizer) if chat else ChatFormat.plain()
        self.progress = progress
        allocation = self._allocation(model)
        self.cache = model.new_cache(positions=self._first_positions(allocation), allocation=allocation)
        #: per layer ``(B, Hkv, entries)``: the attention the last segment's last queries gave each entry
        #: (per-head caches with an observation window), until the cache next changes
        self.observed: list[torch.Tensor] | None = None
        self.sinks = self.nuggets = self.raw = 0  # entries per part: [sinks][nuggets][raw], one row
        self.pending: list[int] = []  # sampled by the last answer, not yet in the cache
        self._waiting: list[int] = []  # read but not yet a full segment
        self._started = False
        self._progress_bar = None  # while ingest() shows progress: advanced by every segment encoded
        self.turns = 0
        self.stats = SessionStats()

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

    def _allocation(self, model: Nugget2DModel) -> str:
        """The cache's allocation: ``auto`` is ``head`` for a per-head scorer under the nugget2d policy
        with eviction, ``token`` otherwise."""
        chosen = self.settings.allocation
        if chosen != "auto":
            return chosen
        settings = self.settings
        fits = settings.policy == "nugget2d" and settings.overflow == "evict"
        return "head" if model.scorer.heads is not None and fits else "token"

    # --- reading ---------------------------------------------------------------------------------

    def ingest(self, source: str | Path | Iterable[str]) -> int:
        """Read a string, a text file (``Path``) or an iterator of text chunks; return tokens read.

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
        total = None
        if pieces is not None and self.progress:  # a first, fast pass: the bar counts tokens and shows what is left
            total = sum(len(ids) for ids in token_chunks(self.tokenizer, pieces()))
            total += 0 if self._started else len(self._start_ids())
        before = self.stats.tokens_ingested
        with tqdm(
            total=total, unit="tok", unit_scale=True, desc="ingest", file=sys.stderr, disable=not self.progress
        ) as bar:
            self._progress_bar = bar
            try:
                for ids in token_chunks(self.tokenizer, pieces() if pieces is not None else source):
                    self.ingest_ids(ids, final=False)
                self.ingest_ids([], final=True)
            finally:
                self._progress_bar = None
        read = self.stats.tokens_ingested - before
        if read == 0:
            raise ValueError("the text is empty (no tokens)")
        return read

    @torch.no_grad()
    def ingest_ids(self, ids: Iterable[int], final: bool = True) -> None:
        """Encode token ids into the cache in segments of ``segment`` tokens, whatever the sizes of
        the calls; a shorter last segment is encoded when ``final``, otherwise it waits for more."""
        ids = [int(t) for t in ids]
        if ids and not self._started:
            ids, self._started = self._start_ids() + ids, True
        self._waiting.extend(ids)
        size = self.settings.segment
        started = time.perf_counter()
        while len(self._waiting) >= size or (final and self._waiting):
            segment, self._waiting = self._waiting[:size], self._waiting[size:]
            self._encode_segment(segment)
            if self._progress_bar is not None:
                self._progress_bar.update(len(segment))
        self.stats.ingest_seconds += time.perf_counter() - started
        self._refresh_stats()

    def _start_ids(self) -> list[int]:
        return start_ids(self.tokenizer, self.format)

    def _encode_segment(self, ids: list[int]) -> None:
        self._check_original_positions(len(ids))
        settings = self.settings
        held = self.sinks + self.nuggets + self.raw
        # Streaming compresses what leaves the raw window before every segment; with a read budget the
        # text stays whole until the next segment would overflow it, then shrinks into the budget.
        if settings.read_budget is None or held + len(ids) > settings.read_capacity:
            self._make_room(max(0, len(ids) - (settings.read_capacity - settings.budget)), keep_raw=settings.recent)
        observer = self._observer()
        # the encoder adapter writes nugget2d's cache; the other policies, baselines of the unmodified
        # model, keep its own K/V
        frozen = settings.policy != "nugget2d"
        self.model.encode(
            torch.tensor([ids], device=self.model.device), cache=self.cache, frozen=frozen, observer=observer
        )
        if isinstance(observer, HeadAttentionReceived):
            self.observed = observer.layers(len(self.cache.layers))
        elif observer is not None:
            accumulate_attention(self.cache, observer.total, len(ids))
        self.stats.encoder_calls += 1
        self.stats.tokens_ingested += len(ids)
        self._append_raw(len(ids))

    def _observer(self) -> AttentionReceived | HeadAttentionReceived | None:
        """What watches the attention while a segment is read: the snapkv policy's running totals, a
        per-head cache's last ``observation_window`` queries, or nothing."""
        if self.settings.policy == "snapkv":
            return AttentionReceived()
        if self.allocation == "head" and self.settings.observation_window:
            return HeadAttentionReceived(self.settings.observation_window)
        return None

    def _append_raw(self, count: int) -> None:
        """Count ``count`` entries just appended: the stream's first tokens fill the sinks."""
        as_sinks = min(count, self.settings.sinks - self.sinks) if self.nuggets == self.raw == 0 else 0
        self.sinks += as_sinks
        self.raw += count - as_sinks

    # --- asking ----------------------------------------------------------------------------------

    def ask(self, question: str, settings: GenerationSettings | None = None) -> Iterator[str]:
        """Stream the answer to ``question`` as text pieces; the exchange stays in the session."""
        settings = settings or GenerationSettings()
        prompt = self.prompt_ids(question, settings)
        deltas = TextDeltas(self.tokenizer, settings.stop)
        for token in self.ask_ids(prompt, settings):
            piece = deltas.push(token)
            if piece:
                yield piece
            if deltas.stopped:
                return
        tail = deltas.flush()
        if tail:
            yield tail

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
        self, prompt_ids: Iterable[int], settings: GenerationSettings | None = None, scoring: Scoring | None = None
    ) -> Iterator[int]:
        """Stream new token ids after ``prompt_ids``; closing the iterator early keeps the session usable.
        A ``scoring`` records the log-probabilities of the new tokens (and of ``prompt_ids`` when it asks)."""
        settings = settings or GenerationSettings()
        self.ingest_ids([], final=True)
        prompt = self.pending + [int(t) for t in prompt_ids]
        self._check_fits(len(prompt), settings)
        self._open_turn(len(prompt) + settings.max_new_tokens)
        stream = TokenStream(self.model, self.cache, prompt, settings, self._eos_ids(), scoring)
        started = time.perf_counter()
        try:
            yield from stream
        finally:
            self.turns += 1
            self.stats.generated_tokens += len(stream.generated)
            self._close_turn(stream.cache, stream.unfed, len(prompt), started)

    def _eos_ids(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        generation = getattr(self.model.base, "generation_config", None)
        extra = getattr(generation, "eos_token_id", None) if generation is not None else None
        extra = extra if isinstance(extra, list) else [extra]
        return [t for t in [eos, *extra] if t is not None]

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
        self._close_turn(returned_cache(out), [], len(prompt), started)
        return scored

    def _open_turn(self, needed: int, fed: int | None = None) -> None:
        """Before a question or a scoring: free the cache for ``needed`` entries, of which ``fed`` (all,
        by default) will be fed, keeping only the ``recent`` window raw."""
        self._check_original_positions(needed if fed is None else fed)
        with torch.no_grad():
            self._make_room(needed, keep_raw=self._raw_when_asked(needed))

    def _close_turn(self, cache: NuggetCache, pending: list[int], prompt_tokens: int, started: float) -> None:
        """After a question or a scoring: adopt the ``cache`` it grew (its new entries count as raw), keep
        the ids it left ``pending``, and count its time. The attention record is dropped: it described
        the entries before the turn."""
        fed = cache.get_seq_length() - self.cache.get_seq_length()
        self.cache, self.pending, self.observed = cache, pending, None
        self._append_raw(fed)
        self.stats.prompt_tokens += prompt_tokens
        self.stats.decode_seconds += time.perf_counter() - started
        self._refresh_stats()

    # --- keeping the cache inside its budget -------------------------------------------------------

    def _raw_when_asked(self, needed: int) -> int:
        """Raw entries that stay raw before ``needed`` tokens are fed: the ``recent`` window, fewer if the
        budget is short; the rest of the last segment is compressed, so what a question reads does not
        depend on where the text's last segment ended (at 2k this beat keeping ``recent + segment``
        raw on both bench metrics, ``benchmarks/reading/README.md``)."""
        settings = self.settings
        return min(self.raw, settings.recent, settings.budget - settings.sinks - needed)

    def _make_room(self, incoming: int, keep_raw: int) -> None:
        """Compress raw tokens beyond ``keep_raw`` into nuggets, then shrink the nuggets until
        ``incoming`` more entries fit the budget."""
        keep_raw = max(0, keep_raw)
        scores = self.cache.layers[0].scores
        if scores is None:
            return
        if self.settings.policy == "streaming":  # nothing is kept, so the raw window takes all the room
            keep_raw = max(keep_raw, self.settings.budget - self.sinks - incoming)
        if self.allocation == "head":
            self._make_room_per_head(incoming, keep_raw)
            return
        scores = scores[0]
        start = self.sinks + self.nuggets
        leaving = self.raw - keep_raw if self.raw > keep_raw else 0
        keep = list(range(self.sinks))
        nuggets = list(range(self.sinks, start))
        converted = self._choose(list(range(start, start + leaving)), scores) if leaving else []
        raw = list(range(start + leaving, start + self.raw))
        over = len(keep) + len(nuggets) + len(converted) + len(raw) + incoming - self.settings.budget
        all_nuggets = self._shrink(nuggets + converted, scores, max(over, 0))
        if len(all_nuggets) == len(nuggets) and not leaving:
            return  # nothing moves
        index = torch.tensor([keep + all_nuggets + raw], device=self.model.device)
        self.cache.retain(index)
        if self.settings.policy == "nugget2d":  # the baselines keep plain K/V: no score bias
            self.cache.convert(
                torch.isin(index, torch.tensor(converted, dtype=torch.long, device=index.device)),
                self.model.config.bias_mode,
            )
        if self.cache.position_mode == "cache":
            self.cache.reposition(self.model.rotary_emb)
        self.nuggets, self.raw = len(all_nuggets), len(raw)

    def _make_room_per_head(self, incoming: int, keep_raw: int) -> None:
        """:meth:`_make_room` for a per-head cache: the same token-level budget, but the nuggets' entries
        (old ones and ``ceil(n·r)`` per leaving token block, times layers × KV heads) go to the
        highest-scoring (layer, head, token) triples; the lowest are evicted."""
        leaving = max(self.raw - keep_raw, 0)
        raw = self.raw - leaving
        wanted = self.nuggets + (nugget_count(leaving, self.settings.ratio) if leaving else 0)
        room = self.settings.budget - self.sinks - raw - incoming
        nuggets = max(0, min(wanted, room))
        if nuggets == self.nuggets and not leaving:
            return  # nothing moves
        entries = nuggets * self.model.num_layers * self.model.num_kv_heads
        keep = torch.tensor([entries], device=self.model.device)
        observed, self.observed = self.observed, None  # it describes the entries before this change
        self.cache.keep_top_entries(
            keep,
            self.model.rotary_emb,
            tail=raw,
            lead=self.sinks,
            bias_mode=self.model.config.bias_mode,
            observed=observed,
        )
        self.cache.nugget_span = torch.tensor([nuggets], device=self.model.device)
        if self.cache.position_mode == "cache":
            self.cache.reposition(self.model.rotary_emb)
        self.nuggets, self.raw = nuggets, raw

    def _choose(self, indices: list[int], scores: torch.Tensor) -> list[int]:
        """Which of the consecutive cache entries ``indices`` stay, by the policy: the scorer's
        selection (nugget2d), none (streaming), the top ``ceil(n·r)`` by attention received (snapkv),
        or one mean-pooled entry per group of ``ceil(n·r)`` groups, pooled in place (compressive)."""
        policy, ratio = self.settings.policy, self.settings.ratio
        if policy == "streaming":
            return []
        if policy == "compressive":
            return pool_groups(self.cache, indices, nugget_count(len(indices), ratio), self.model.rotary_emb)
        if policy == "snapkv":
            return [indices[i] for i in topk_in_order(scores[indices], nugget_count(len(indices), ratio))]
        chosen, _ = self.model.select(scores[indices][None], ratio=ratio)
        return [indices[int(i)] for i in chosen[0]]

    def _shrink(self, nuggets: list[int], scores: torch.Tensor, remove: int) -> list[int]:
        """Drop ``remove`` of the ``nuggets`` (cache indices, text order): the lowest-scoring, the
        oldest for ``compressive`` (evict), or by choosing among the oldest again at the ratio (recompress)."""
        remove = min(remove, len(nuggets))
        if remove <= 0:
            return nuggets
        ratio = self.settings.ratio
        if self.settings.overflow == "recompress" and ratio < 1:
            block = min(len(nuggets), math.ceil(remove / (1 - ratio)))
            while block < len(nuggets) and block - nugget_count(block, ratio) < remove:
                block += 1
            if block - nugget_count(block, ratio) >= remove:
                return self._choose(nuggets[:block], scores) + nuggets[block:]
        if self.settings.policy == "compressive":
            return nuggets[remove:]
        order = scores[nuggets].argsort(descending=True)[: len(nuggets) - remove]
        return sorted(nuggets[int(i)] for i in order)

    def _check_original_positions(self, incoming: int) -> None:
        """Before ``incoming`` tokens: with text positions past the model's window, ``auto`` renumbers the
        cache by entries (keys re-rotated) from here on; ``original`` refuses."""
        if self.cache.position_mode != "original":
            return
        seen = int(self.cache.seen_tokens[0]) if self.cache.seen_tokens is not None else 0
        if seen + incoming > self.window and self.settings.positions == "auto":
            self.cache.position_mode = "cache"
            if self.cache.batch_size:
                self.cache.reposition(self.model.rotary_emb)
        elif seen + incoming > self.window:
            raise ValueError(
                f"positions='original' keeps text positions, and {seen + incoming} tokens exceed the model's native "
                f"window ({self.window}); use positions='auto' or 'cache' for longer texts"
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
        return twin

    def save(self, directory: str | Path) -> Path:
        """Write the session (cache, settings, template pieces, counters) into ``directory``;
        :meth:`load` reads it back into a session that answers exactly as this one."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.cache.save(directory / "cache.safetensors")
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
            session.stats = SessionStats(**state["stats"])
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"{directory} does not hold a readable saved session: {err}") from err
        session.cache = NuggetCache.load(directory / "cache.safetensors", device=model.device)
        session.cache.check_model(model.fingerprint)
        observed = directory / "observed.safetensors"
        if observed.is_file():
            seen = load_file(observed, device=str(model.device))
            session.observed = [seen[str(i)] for i in range(len(seen))]
        return session


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
