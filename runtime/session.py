"""A streaming session: read a text of any length into a bounded nugget cache, then ask about it.

The cache has three parts inside one budget (DESIGN §4): the first ``sinks`` tokens raw, nuggets
of the far past, and the last ``recent`` tokens raw. Text is encoded ``segment`` tokens at a
time by the encoder adapter, attending to the cache so far; as tokens leave the raw window the
scorer's top ``ceil(n·ratio)`` of them stay as nuggets. When the nuggets outgrow their room the
lowest-scoring are evicted, or the oldest are selected again (``overflow="recompress"``). With
``positions="cache"`` a token's position is the number of entries before it and moved keys are
re-rotated, so no position ever reaches the model's native window.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from nugget2d.compress import Nugget2DModel, nugget_count
from nugget2d.compress.config import check_ratio
from nugget2d.compress.rope import check_rerotatable

from .chat import ChatFormat
from .generation import GenerationSettings, TextDeltas, TokenStream
from .resources import peak_rss_bytes
from .texts import file_chunks, token_chunks


@dataclass
class StreamSettings:
    """The cache's shape: total ``budget`` of entries, of which ``sinks`` first tokens and the
    ``recent`` last tokens stay raw; text is read ``segment`` tokens at a time."""

    ratio: float = 0.1
    budget: int = 2048
    recent: int = 512
    segment: int = 256
    sinks: int = 4
    overflow: Literal["evict", "recompress"] = "evict"
    positions: Literal["cache", "original"] = "cache"

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        for name in ("budget", "segment"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("recent", "sinks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.overflow not in ("evict", "recompress"):
            raise ValueError(f"overflow must be 'evict' or 'recompress', got {self.overflow!r}")
        if self.positions not in ("cache", "original"):
            raise ValueError(f"positions must be 'cache' or 'original', got {self.positions!r}")
        floor = self.sinks + self.recent + self.segment
        if self.budget <= floor:
            raise ValueError(
                f"budget ({self.budget}) must exceed sinks + recent + segment ({self.sinks} + {self.recent} + "
                f"{self.segment} = {floor}) to leave room for nuggets; raise --budget or lower --recent/--segment"
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
        if self.settings.positions == "cache":
            check_rerotatable(model.rotary_emb)
        self.window = int(model.base.config.max_position_embeddings)
        self.format = ChatFormat.from_tokenizer(tokenizer) if chat else ChatFormat.plain()
        self.progress = progress
        self.cache = model.new_cache(positions=self.settings.positions)
        self.sinks = self.nuggets = self.raw = 0  # entries per part: [sinks][nuggets][raw], one row
        self.pending: list[int] = []  # sampled by the last answer, not yet in the cache
        self._waiting: list[int] = []  # read but not yet a full segment
        self._started = False
        self.turns = 0
        self.stats = SessionStats()

    # --- reading ---------------------------------------------------------------------------------

    def ingest(self, source: str | Path | Iterable[str]) -> int:
        """Read a string, a text file (``Path``) or an iterator of text chunks; return tokens read.

        Bad input (missing, empty or binary file) raises ``ValueError`` before anything is read.
        """
        if isinstance(source, Path):
            chunks, total = file_chunks(source), source.stat().st_size
        elif isinstance(source, str):
            if not source.strip():
                raise ValueError("the text is empty")
            chunks, total = _pieces(source), len(source.encode("utf-8"))
        else:
            chunks, total = source, None
        before = self.stats.tokens_ingested
        with tqdm(
            total=total, unit="B", unit_scale=True, desc="ingest", file=sys.stderr, disable=not self.progress
        ) as bar:
            for ids in token_chunks(self.tokenizer, _reported(chunks, bar)):
                self.ingest_ids(ids, final=False)
            self.ingest_ids([], final=True)
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
        self.stats.ingest_seconds += time.perf_counter() - started
        self._refresh_stats()

    def _start_ids(self) -> list[int]:
        """Tokens that open the stream: the chat template's text before the document, or BOS."""
        if self.format.document_prefix:
            return self.tokenizer(self.format.document_prefix, add_special_tokens=False).input_ids
        bos = self.tokenizer.bos_token_id
        probe = self.tokenizer("a").input_ids
        return [bos] if bos is not None and probe and probe[0] == bos else []

    def _encode_segment(self, ids: list[int]) -> None:
        self._check_original_positions(len(ids))
        self._make_room(len(ids), keep_raw=self.settings.recent)
        self.model.encode(torch.tensor([ids], device=self.model.device), cache=self.cache)
        self.stats.encoder_calls += 1
        self.stats.tokens_ingested += len(ids)
        self._append_raw(len(ids))

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

    def ask_ids(self, prompt_ids: Iterable[int], settings: GenerationSettings | None = None) -> Iterator[int]:
        """Stream new token ids after ``prompt_ids``; closing the iterator early keeps the session usable."""
        settings = settings or GenerationSettings()
        self.ingest_ids([], final=True)
        prompt = self.pending + [int(t) for t in prompt_ids]
        self._check_fits(len(prompt), settings)
        needed = len(prompt) + settings.max_new_tokens
        self._check_original_positions(needed)
        with torch.no_grad():
            self._make_room(needed, keep_raw=min(self.raw, self.settings.budget - self.settings.sinks - needed))
        stream = TokenStream(self.model, self.cache, prompt, settings, self._eos_ids())
        started = time.perf_counter()
        try:
            yield from stream
        finally:
            fed = stream.cache.get_seq_length() - self.cache.get_seq_length()
            self.cache, self.pending = stream.cache, stream.unfed
            self._append_raw(fed)
            self.turns += 1
            self.stats.prompt_tokens += len(prompt)
            self.stats.generated_tokens += len(stream.generated)
            self.stats.decode_seconds += time.perf_counter() - started
            self._refresh_stats()

    def _eos_ids(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        generation = getattr(self.model.base, "generation_config", None)
        extra = getattr(generation, "eos_token_id", None) if generation is not None else None
        extra = extra if isinstance(extra, list) else [extra]
        return [t for t in [eos, *extra] if t is not None]

    # --- keeping the cache inside its budget -------------------------------------------------------

    def _make_room(self, incoming: int, keep_raw: int) -> None:
        """Compress raw tokens beyond ``keep_raw`` into nuggets, then shrink the nuggets until
        ``incoming`` more entries fit the budget."""
        keep_raw = max(0, keep_raw)
        scores = self.cache.layers[0].scores
        if scores is None:
            return
        scores = scores[0]
        start = self.sinks + self.nuggets
        leaving = self.raw - keep_raw if self.raw > keep_raw else 0
        keep = list(range(self.sinks))
        nuggets = list(range(self.sinks, start))
        converted: list[int] = []
        if leaving:
            block = scores[start : start + leaving]
            chosen, _ = self.model.select(block[None], ratio=self.settings.ratio)
            converted = [start + int(i) for i in chosen[0]]
        raw = list(range(start + leaving, start + self.raw))
        over = len(keep) + len(nuggets) + len(converted) + len(raw) + incoming - self.settings.budget
        all_nuggets = self._shrink(nuggets + converted, scores, max(over, 0))
        if len(all_nuggets) == len(nuggets) and not leaving:
            return  # nothing moves
        index = torch.tensor([keep + all_nuggets + raw], device=self.model.device)
        self.cache.retain(index)
        self.cache.convert(
            torch.isin(index, torch.tensor(converted, dtype=torch.long, device=index.device)),
            self.model.config.bias_mode,
        )
        if self.settings.positions == "cache":
            self.cache.reposition(self.model.rotary_emb)
        self.nuggets, self.raw = len(all_nuggets), len(raw)

    def _shrink(self, nuggets: list[int], scores: torch.Tensor, remove: int) -> list[int]:
        """Drop ``remove`` of the ``nuggets`` (cache indices, text order): the lowest-scoring
        (evict), or by selecting the oldest ones again at the ratio (recompress)."""
        remove = min(remove, len(nuggets))
        if remove <= 0:
            return nuggets
        ratio = self.settings.ratio
        if self.settings.overflow == "recompress" and ratio < 1:
            block = min(len(nuggets), math.ceil(remove / (1 - ratio)))
            while block < len(nuggets) and block - nugget_count(block, ratio) < remove:
                block += 1
            if block - nugget_count(block, ratio) >= remove:
                chosen, _ = self.model.select(scores[nuggets[:block]][None], ratio=ratio)
                return [nuggets[int(i)] for i in chosen[0]] + nuggets[block:]
        order = scores[nuggets].argsort(descending=True)[: len(nuggets) - remove]
        return sorted(nuggets[int(i)] for i in order)

    def _check_original_positions(self, incoming: int) -> None:
        if self.settings.positions != "original":
            return
        seen = int(self.cache.seen_tokens[0]) if self.cache.seen_tokens is not None else 0
        if seen + incoming > self.window:
            raise ValueError(
                f"positions='original' keeps text positions, and {seen + incoming} tokens exceed the model's native "
                f"window ({self.window}); use positions='cache' for longer texts"
            )

    def _refresh_stats(self) -> None:
        stats = self.stats
        stats.cache_tokens = int(self.cache.entry_counts()[0]) if self.cache.batch_size else 0
        stats.nugget_tokens = self.nuggets
        stats.cache_bytes = self.cache.nbytes
        total = stats.tokens_ingested + stats.prompt_tokens + stats.generated_tokens
        stats.full_kv_bytes = self.model.full_kv_bytes(total)
        stats.peak_rss_bytes = peak_rss_bytes()


def _pieces(text: str, size: int = 1 << 16) -> Iterator[str]:
    for begin in range(0, len(text), size):
        yield text[begin : begin + size]


def _reported(chunks: Iterable[str], bar) -> Iterator[str]:
    for chunk in chunks:
        yield chunk
        bar.update(len(chunk.encode("utf-8")))
