"""Look-back: before answering, read the passages a question needs raw again, for that answer only.

A session keeps the token ids of everything it read (4 bytes a token). When a question comes with
look-back ``N`` (:attr:`CacheConfig.lookback <nugget2d.runtime.cache_config.CacheConfig.lookback>`):

1. a **selector** scores windows of ``span`` tokens (overlapping by half) of the text the answer would
   not hold otherwise (after the sinks and older than the raw recent window; for ``alone`` below, to the
   end): by the attention the question's tokens give the kept entries there (``attention``, read over a
   fork of the cache, per layer and KV head, each head's vote normalised), by BM25 between the question
   and each window's text (``bm25``, the ``bm25s`` library), by both (``hybrid``: each score over its
   maximum, summed), or, in benchmarks, by whether a window holds the answer (``oracle``);
2. the best windows up to ``N`` tokens (none scoring below half the best one's, :data:`DEFAULT_CUTOFF`)
   are merged into spans and read raw, in text order, the way the question is read (the unmodified
   model, or the decoder LoRA where one was trained: they are never compressed, so the encoder adapter
   has no part in them; at 32k it measured better), where the **placement** says
   (:attr:`CacheConfig.lookback_placement <nugget2d.runtime.cache_config.CacheConfig.lookback_placement>`):
   as a block after the cache's entries, just before the question (``"after"``), at their own text
   positions while the cache is numbered by text position (``"text"``; the spans then also see the later
   text as if it came before them), or alone (``"alone"``: a fresh cache holding the text's opening — the
   chat template's start, or the sinks — and the spans, the resident cache hidden for this answer).
   ``"auto"`` (the default) reads them after the cache while it is numbered by text position and alone
   past the model's window, where each answered best (``benchmarks/lookback/``: after the cache, every
   2k and 8k fact and needle; past the window alone 9 of 12 planted facts at 32k, after the cache 5);
3. the question is read over that fork and answered; the fork is dropped, so the session's cache is
   the one it held before the question.

The attention selector needs each kept entry's text position: a cache numbered by entries
(``positions="cache"``, or ``auto`` past the model's window) no longer has them, so there ``attention``
refuses and ``hybrid`` scores by BM25 alone (with a warning).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from nugget2d.compress import Nugget2DModel, NuggetCache

from .cache_config import PLACEMENTS
from .generation import GenerationSettings, Scoring, StepBatcher, TokenStream
from .lookback_select import READS_CACHE, SELECTORS, has_text_positions, plan

DEFAULT_SELECTOR = "bm25"  # as right as hybrid at 2k, fewer tokens read, any position mode (benchmarks/lookback)
DEFAULT_SPAN = 64
#: Windows scoring below this share of the best window's score are not read (see :class:`LookBack`).
DEFAULT_CUTOFF = 0.5
_log = logging.getLogger("nugget2d")


def check_lookback(tokens: int) -> None:
    """``ValueError`` unless ``tokens`` is a look-back size (0 = off)."""
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise ValueError(f"lookback must be a whole number of tokens >= 0 (0 = off), got {tokens!r}")


def check_lookback_choice(selector: str, span: int, placement: str, cutoff: float) -> None:
    """``ValueError`` for an unknown selector or placement, a span below 2 tokens or a cutoff outside 0..1."""
    if selector not in SELECTORS:
        raise ValueError(f"the look-back selector must be one of {list(SELECTORS)}, got {selector!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"the look-back placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    if not 0.0 <= cutoff <= 1.0:
        raise ValueError(f"the look-back cutoff must be a share of the best score, 0 to 1, got {cutoff}")
    if span < 2:
        raise ValueError(f"the look-back span must be >= 2 tokens, got {span}")


@dataclass
class LookBack:
    """How much to read back before an answer (``tokens``, 0 = off), chosen by ``selector`` (a name in
    :data:`SELECTORS`) over windows of ``span`` tokens, read where ``placement`` says (a name in
    :data:`PLACEMENTS`; ``auto``: after the cache while it is numbered by text position, else alone);
    ``answers``: what the ``oracle`` selector looks for (benchmarks only); ``cutoff``: windows scoring
    below that share of the best window's score are not read, even when ``tokens`` leaves room (0: fill
    the look-back with the best windows, whatever their score)."""

    tokens: int = 0
    selector: str = DEFAULT_SELECTOR
    span: int = DEFAULT_SPAN
    placement: str = "auto"
    answers: tuple[str, ...] = ()
    cutoff: float = DEFAULT_CUTOFF

    def __post_init__(self) -> None:
        check_lookback(self.tokens)
        check_lookback_choice(self.selector, self.span, self.placement, self.cutoff)
        if self.selector == "oracle" and not self.answers:
            raise ValueError("the oracle selector needs the answers it looks for (benchmarks only)")
        self.answers = tuple(self.answers)


@dataclass
class LookBackStats:
    """What look-back did in a session: questions, tokens read back, seconds choosing and reading, the
    largest cache a question read (bytes), and the last question's spans (text positions) and where they
    were read (its placement, ``auto`` resolved)."""

    questions: int = 0
    tokens_read: int = 0
    select_seconds: float = 0.0
    read_seconds: float = 0.0
    peak_cache_bytes: int = 0
    last_spans: list[tuple[int, int]] = field(default_factory=list)
    last_placement: str = ""


@torch.no_grad()
def read_spans(
    model: Nugget2DModel,
    cache: NuggetCache,
    ids: np.ndarray,
    spans: list[tuple[int, int]],
    placement: str,
    opening: int = 0,
) -> NuggetCache:
    """A fork of ``cache`` with the tokens of ``spans`` appended raw, in text order, read as a prompt is
    (:meth:`Nugget2DModel.read`): at their text positions when ``placement="text"`` and the cache is
    numbered by text position, else after its entries. The next tokens are numbered as they would be
    without the spans under ``text``. ``placement="alone"``: instead of a fork, a new cache holding the
    text's first ``opening`` tokens and the spans (none found: the fork, as without look-back). ``auto``
    is resolved by the caller (:func:`ask_looking_back`); here it reads as ``after``."""
    if placement == "alone" and spans:
        alone = model.new_cache()
        block = np.concatenate([ids[:opening], *(ids[start:stop] for start, stop in spans)])
        return model.read(torch.tensor([block.tolist()], device=model.device), alone)
    fork = cache.fork()
    if not spans:
        return fork
    if not (placement == "text" and has_text_positions(cache)):  # one block after the entries: one pass
        block = np.concatenate([ids[start:stop] for start, stop in spans])
        model.read(torch.tensor([block.tolist()], device=model.device), fork)
        return fork
    seen = fork.seen_tokens
    for start, stop in spans:
        fork.seen_tokens = torch.full_like(seen, start)
        model.read(torch.tensor([ids[start:stop].tolist()], device=model.device), fork)
    fork.seen_tokens = seen
    return fork


def resolve(default: LookBack, lookback: int | LookBack | None, has_ids: bool) -> LookBack:
    """The look-back of one question: ``default``, ``lookback`` tokens of it, or ``lookback`` as given;
    ``ValueError`` for a look-back where the session has no token ids (``has_ids`` False)."""
    if lookback is None:
        look = default
    elif isinstance(lookback, LookBack):
        look = lookback
    else:
        look = dataclasses.replace(default, tokens=lookback)  # validated again
    if look.tokens and not has_ids:
        raise ValueError(
            "look-back needs the token ids of the text, and this session was saved before sessions kept them; "
            "read the text again (upload the document again) or ask with lookback 0"
        )
    return look


def ask_looking_back(
    session: Any,  # a StreamingSession (not imported here: the session imports this module)
    prompt_ids: list[int],
    settings: GenerationSettings,
    scoring: Scoring | None,
    look: LookBack,
    question: str | None,
    batcher: StepBatcher | None = None,
) -> Iterator[int | None]:
    """New token ids after ``prompt_ids`` with look-back: on a copy of ``session``, choose spans of its text
    for the prompt, read them raw into a fork of the copy's cache and answer over it. ``session`` keeps its
    cache, pending tokens and turns; its counters and :class:`LookBackStats` count the work. With a
    ``batcher`` the answer decodes with other streams (``None`` yielded while a pass waits)."""
    session.ingest_ids([], final=True)
    twin = session.fork()
    prompt = twin.pending + prompt_ids
    twin._check_fits(len(prompt), settings)
    needed = len(prompt) + settings.max_new_tokens
    placement = look.placement
    if placement == "auto":  # after the cache while it keeps text positions with the spans in, else alone
        placement = "after" if twin.keeps_text_positions(look.tokens + needed) else "alone"
    if placement == "after":  # the spans take positions too
        twin._check_original_positions(look.tokens + needed)
    if placement != "alone" or look.selector in READS_CACHE:  # alone, BM25 and the oracle never read it
        twin._open_turn(needed)
    stats, started = session.lookback_stats, time.perf_counter()
    ids = np.frombuffer(twin.token_ids, dtype=np.int32)
    text = question if question is not None else session.tokenizer.decode(prompt_ids, skip_special_tokens=True)
    model, cache = session.model, twin.cache
    # windows after the sinks (the grid measured), up to the raw window, which is in the cache already;
    # alone, the answer holds none of the text but its opening, so the raw window may be read too
    stop = len(ids) if placement == "alone" else len(ids) - twin.raw
    spans = plan(look, model, session.tokenizer, cache, ids, twin.sinks, stop, prompt, text)
    _add_seconds(stats, "select_seconds", started)
    started = time.perf_counter()
    cache = read_spans(model, cache, ids, spans, placement, session.opening_length())
    _add_seconds(stats, "read_seconds", started)
    stats.questions += 1
    stats.tokens_read += sum(b - a for a, b in spans)
    stats.last_spans, stats.last_placement = spans, placement
    stream = TokenStream(model, cache, prompt, settings, session._eos_ids(), scoring, batcher)
    started = time.perf_counter()
    try:
        yield from stream
    finally:
        stats.peak_cache_bytes = max(stats.peak_cache_bytes, stream.cache.nbytes)
        session.stats.generated_tokens += len(stream.generated)
        session.stats.prompt_tokens += len(prompt)
        session.stats.decode_seconds += time.perf_counter() - started


def _add_seconds(stats: LookBackStats, name: str, started: float) -> None:
    setattr(stats, name, getattr(stats, name) + time.perf_counter() - started)


#: The file of a saved session that holds its token ids.
IDS_FILE = "token_ids.safetensors"


def save_ids(ids: array | None, path: Path) -> None:
    """Write a session's token ids (int32) to ``path``; remove ``path`` when there are none."""
    if ids is None:
        path.unlink(missing_ok=True)
        return
    save_file(
        {"ids": torch.frombuffer(bytearray(ids), dtype=torch.int32) if ids else torch.zeros(0, dtype=torch.int32)},
        str(path),
    )


def load_ids(path: Path, cache: NuggetCache) -> array | None:
    """The token ids saved with a session; None (look-back unavailable) for one saved before sessions
    kept them, or when their count differs from the tokens the cache read."""
    if not path.is_file():
        return None
    try:
        ids = array("i", load_file(str(path))["ids"].to(torch.int32).numpy().tobytes())
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"{path} does not hold a session's token ids: {err}") from err
    if len(ids) != cache.tokens_read():
        _log.warning(
            "%s holds %d token ids but the cache read %d tokens: look-back is off", path, len(ids), cache.tokens_read()
        )
        return None
    return ids
