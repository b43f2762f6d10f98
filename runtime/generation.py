"""The one generation loop: decode tokens over a nugget cache (CLI, server and jobs all call it).

Sampling reuses transformers' logits processors (repetition penalty, temperature, top-k, top-p).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from nugget2d.compress import Nugget2DModel, NuggetCache
from nugget2d.compress.hf_compat import returned_cache


@dataclass
class GenerationSettings:
    """How to pick the next tokens; greedy when ``temperature`` is 0."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    #: Never stop at an EOS id (benchmarks that time a fixed number of decode steps).
    ignore_eos: bool = False
    #: Never produce an n-gram of this many tokens twice in the prompt and answer (0 = off).
    no_repeat_ngram: int = 0

    def __post_init__(self) -> None:
        self.stop = tuple(s for s in self.stop if s)
        checks = [
            (self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}"),
            (self.no_repeat_ngram >= 0, f"no_repeat_ngram must be >= 0 (0 = off), got {self.no_repeat_ngram}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def processors(self) -> LogitsProcessorList:
        """transformers' logits processors for these settings (empty for plain greedy)."""
        chain = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            chain.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.no_repeat_ngram > 0:
            chain.append(NoRepeatNGramLogitsProcessor(self.no_repeat_ngram))
        if self.temperature > 0:
            chain.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                chain.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                chain.append(TopPLogitsWarper(self.top_p))
        return chain


#: A log-probability too small for a float (a token the model rules out), as OpenAI reports it.
LOGPROB_FLOOR = -9999.0


@dataclass
class TokenScore:
    """A token's log-probability under the model's own next-token distribution (before temperature,
    top-k/p and repetition penalty), with the ``top`` most likely ``(id, log-probability)`` at its
    position, most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Scoring:
    """What a :class:`TokenStream` records besides the tokens, when given one: a :class:`TokenScore`
    with ``top`` alternatives for every new token (the EOS id too, when it ends the stream) and, with
    ``prompt``, for the prompt's tokens after the first, teacher-forced by the same first forward pass
    (which then runs even for ``max_new_tokens=0``)."""

    top: int = 0
    prompt: bool = False
    prompt_scores: list[TokenScore] = field(default_factory=list)
    scores: list[TokenScore] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.top < 0:
            raise ValueError(f"top must be >= 0, got {self.top}")


def token_log_probs(logits: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """float32 log-probabilities ``(n,)`` of ``targets`` under the next-token ``logits`` ``(n, vocab)``."""
    index = torch.tensor(targets, device=logits.device)[:, None]
    return logits.float().log_softmax(dim=-1).gather(1, index)[:, 0]


def score_tokens(logits: torch.Tensor, targets: list[int], top: int = 0) -> list[TokenScore]:
    """:class:`TokenScore` of each of ``targets`` under the next-token ``logits`` ``(n, vocab)``."""
    logprobs = logits.float().log_softmax(dim=-1).clamp(min=LOGPROB_FLOOR)
    chosen = logprobs.gather(1, torch.tensor(targets, device=logits.device)[:, None])[:, 0].tolist()
    if top:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        best = [list(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]
    else:
        best = [[] for _ in targets]
    return [TokenScore(int(t), lp, alternatives) for t, lp, alternatives in zip(targets, chosen, best)]


class StepBatcher(Protocol):
    """What runs the decode passes of several :class:`TokenStream` s together
    (:class:`~nugget2d.runtime.batched_decode.DecodeBatcher`)."""

    def request(self, stream: TokenStream) -> None:
        """Queue a pass reading ``stream.feeding`` over ``stream.cache``."""

    def result(self, stream: TokenStream) -> torch.Tensor:
        """The logits ``(1, vocab)`` of the pass run for ``stream`` (raises what the pass raised)."""

    def leave(self, stream: TokenStream) -> bool:
        """Take ``stream`` out of its batch, its own cache back in ``stream.cache``; True if its last
        sampled token was fed."""


class TokenStream:
    """Iterates over new token ids for one row, reading ``cache`` then ``prompt_ids``.

    Stops after ``max_new_tokens`` or at an EOS id (not yielded). Every yielded token but the last
    has been fed to the model: :attr:`cache` always holds the prompt and the fed tokens, and
    :attr:`unfed` the tokens sampled but not yet in it. With a ``scoring``, log-probabilities are
    recorded into it as the tokens come (:class:`Scoring`).

    The prompt is read by a pass of its own; with a ``batcher`` every later token is read by the
    batcher's passes over several streams at once: the stream then yields ``None`` while its pass is
    queued (run the batcher, then resume it). Solo or batched, each pass's logits go through
    :meth:`take`, the one sampling step.
    """

    def __init__(
        self,
        model: Nugget2DModel,
        cache: NuggetCache,
        prompt_ids: Iterable[int],
        settings: GenerationSettings,
        eos_token_ids: Iterable[int] = (),
        scoring: Scoring | None = None,
        batcher: StepBatcher | None = None,
    ) -> None:
        self.model, self.cache, self.settings, self.scoring = model, cache, settings, scoring
        self.batcher = batcher
        self.prompt = [int(t) for t in prompt_ids]
        if not self.prompt:
            raise ValueError("the prompt is empty: give at least one token to condition on")
        self.eos = set() if settings.ignore_eos else {int(t) for t in eos_token_ids if t is not None}
        self.unfed: list[int] = []
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        self._passes = 0  # forward passes taken so far
        self._history: torch.Tensor | None = None
        self._generator: torch.Generator | None = None
        self._processors = LogitsProcessorList()

    @property
    def feeding(self) -> list[int]:
        """The ids the next pass reads: the prompt, then the last sampled token."""
        return self.unfed if self._passes else self.prompt

    @property
    def done(self) -> bool:
        """True once every pass the settings allow is taken (a stream also ends when :meth:`take` says so)."""
        scoring = self.scoring
        return self._passes >= max(self.settings.max_new_tokens, int(scoring is not None and scoring.prompt))

    def _begin(self) -> None:
        settings, device = self.settings, self.model.device
        self._generator = (
            torch.Generator(device=device).manual_seed(settings.seed) if settings.seed is not None else None
        )
        self._processors = settings.processors()
        self._history = torch.tensor([self.prompt], device=device)
        self.finish_reason, self._passes = "length", 0

    def take(self, logits: torch.Tensor) -> int | None:
        """The sampling step after a pass that read :attr:`feeding`: ``logits`` ``(fed, vocab)`` are that
        pass's (the last row predicts). Returns the new token, or None when the stream ends here."""
        settings, scoring = self.settings, self.scoring
        first, self.unfed = self._passes == 0, []
        self._passes += 1
        if first and scoring is not None and scoring.prompt:
            scoring.prompt_scores = score_tokens(logits[:-1], self.prompt[1:], scoring.top)
            if settings.max_new_tokens == 0:
                return None  # the prompt is fed and scored; nothing to generate
        scores = self._processors(self._history, logits[-1:].float())
        if settings.temperature > 0:
            token = int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self._generator))
        else:
            token = int(scores.argmax(dim=-1))
        if scoring is not None:
            scoring.scores.extend(score_tokens(logits[-1:], [token], scoring.top))
        if token in self.eos:
            self.finish_reason = "stop"
            return None
        self.unfed = [token]
        self._history = torch.cat([self._history, self._history.new_tensor([[token]])], dim=1)
        self.generated.append(token)
        return token

    @torch.no_grad()
    def __iter__(self) -> Iterator[int | None]:
        self._begin()
        try:
            while not self.done:
                if self.batcher is not None and self._passes:
                    self.batcher.request(self)
                    yield None  # queued: the batcher runs the pass before this stream resumes
                    logits = self.batcher.result(self)
                else:
                    out = self.model(torch.tensor([self.feeding], device=self.model.device), nuggets=self.cache)
                    self.cache, logits = returned_cache(out), out.logits[0]
                token = self.take(logits)
                if token is None:
                    return
                yield token
        finally:
            if self.batcher is not None and self.batcher.leave(self):
                self.unfed = []


class TextDeltas:
    """Turns token ids into text pieces as they come.

    Holds back an unfinished multi-byte character and any tail that could grow into a stop
    string; at the first stop string the text is cut before it and nothing more is shown.
    """

    def __init__(self, tokenizer, stop: Iterable[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.shown = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the new text that is safe to show (may be empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for stop in self.stop:
            at = text.find(stop)
            if at >= 0:
                self.stopped = True
                return self._show(text[:at])
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return ""
        return self._show(text[: self._safe_end(text)])

    def flush(self) -> str:
        """The held-back tail, at the end of generation."""
        if self.stopped:
            return ""
        return self._show(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    @property
    def text(self) -> str:
        """Everything shown so far."""
        return self.shown

    def _safe_end(self, text: str) -> int:
        """Start of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        longest = max((len(s) for s in self.stop), default=0)
        for start in range(max(0, len(text) - longest + 1), len(text)):
            if any(s.startswith(text[start:]) for s in self.stop):
                return start
        return len(text)

    def _show(self, upto: str) -> str:
        if len(upto) <= len(self.shown):
            return ""
        delta, self.shown = upto[len(self.shown) :], upto
        return delta


def text_pieces(tokens: Iterator[int | None], tokenizer, stop: Sequence[str] = ()) -> Iterator[str | None]:
    """The text of ``tokens`` in pieces as they come (:class:`TextDeltas`), cut at the first ``stop``
    string; a ``None`` (a batched pass waiting) passes through. Ending early closes ``tokens``."""
    deltas = TextDeltas(tokenizer, stop)
    try:
        for token in tokens:
            if token is None:
                yield None
                continue
            piece = deltas.push(token)
            if piece:
                yield piece
            if deltas.stopped:
                return
        tail = deltas.flush()
        if tail:
            yield tail
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()
