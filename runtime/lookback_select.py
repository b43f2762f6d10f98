"""Look-back selection: which windows of the text a question reads back (:mod:`nugget2d.runtime.lookback`).

Every selector scores the windows of a :class:`Candidates` (``span`` tokens, overlapping by half, of the
text older than the raw window): ``attention`` by the attention the question gives the kept entries
inside each window, ``bm25`` by BM25 (``bm25s``) between the question and the window's text,
``hybrid`` by both, each over its maximum, and ``oracle`` (benchmarks) by whether it holds the answer.
:func:`choose_spans` takes the best windows up to the look-back's tokens, leaving those far below the best.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from nugget2d.compress import Nugget2DModel, NuggetCache
from nugget2d.compress.adapters import DECODER
from nugget2d.compress.attention import MASKED
from nugget2d.compress.policies.observers import HeadAttentionReceived

SELECTORS = ("attention", "bm25", "hybrid", "oracle")
#: The selectors that read the question over the cache (the others score the text alone).
READS_CACHE = ("attention", "hybrid")
_log = logging.getLogger("nugget2d")


@dataclass
class Candidates:
    """The text a selector chooses from: ``ids`` (all the session read), the windows ``(start, stop)`` of
    the part older than the raw window (``lo``..``hi``), the question's text, and the attention each
    text position received from the question (``mass``; None unless the selector reads attention)."""

    ids: np.ndarray
    windows: list[tuple[int, int]]
    question: str
    tokenizer: object
    mass: np.ndarray | None = None
    _texts: list[str] | None = None

    def texts(self) -> list[str]:
        """Each window's text (decoded once)."""
        if self._texts is None:
            self._texts = [
                self.tokenizer.decode(self.ids[a:b].tolist(), skip_special_tokens=True) for a, b in self.windows
            ]
        return self._texts


def windows(lo: int, hi: int, span: int) -> list[tuple[int, int]]:
    """Windows of ``span`` tokens over ``lo``..``hi``, starting every ``span // 2`` (the last one ends at ``hi``)."""
    if hi - lo <= 0:
        return []
    if hi - lo <= span:
        return [(lo, hi)]
    stride = max(1, span // 2)
    starts = list(range(lo, hi - span + 1, stride))
    if starts[-1] + span < hi:
        starts.append(hi - span)
    return [(s, s + span) for s in starts]


def attention_scores(view: Candidates) -> np.ndarray:
    """Per window, the question's attention (``view.mass``) to the kept entries inside it."""
    if view.mass is None:
        raise ValueError("the attention selector needs the question's attention over the cache")
    total = np.concatenate([[0.0], np.cumsum(view.mass)])
    return np.array([total[b] - total[a] for a, b in view.windows])


def bm25_scores(view: Candidates) -> np.ndarray:
    """Per window, its BM25 score with the question (``bm25s``, English stopwords)."""
    try:
        import bm25s
    except ImportError as err:  # an optional dependency in some installs
        raise ValueError("the bm25 and hybrid look-back selectors need the bm25s package: pip install bm25s") from err
    corpus = bm25s.tokenize(view.texts(), stopwords="en", return_ids=False, show_progress=False)
    query = bm25s.tokenize([view.question], stopwords="en", return_ids=False, show_progress=False)[0]
    if not query or not any(corpus):
        return np.zeros(len(view.windows))
    retriever = bm25s.BM25()
    retriever.index(corpus, show_progress=False)
    return np.asarray(retriever.get_scores(query), dtype=np.float64)


def hybrid_scores(view: Candidates) -> np.ndarray:
    """Attention and BM25 scores, each over its maximum, summed (BM25 alone without attention)."""
    parts = [bm25_scores(view)] + ([attention_scores(view)] if view.mass is not None else [])
    return sum(part / part.max() if part.max() > 0 else part for part in parts)


def oracle_scores(view: Candidates, answers: Sequence[str]) -> np.ndarray:
    """1 for each window whose text holds one of ``answers`` (case-insensitive), else 0."""
    wanted = [a.lower() for a in answers if a.strip()]
    return np.array([float(any(a in text.lower() for a in wanted)) for text in view.texts()])


def select_scores(look, view: Candidates) -> np.ndarray:
    """The scores of ``look.selector`` (a :class:`~nugget2d.runtime.lookback.LookBack`) for every window of ``view``."""
    if look.selector == "attention":
        return attention_scores(view)
    if look.selector == "bm25":
        return bm25_scores(view)
    if look.selector == "hybrid":
        return hybrid_scores(view)
    return oracle_scores(view, look.answers)


def choose_spans(
    scores: np.ndarray, wins: list[tuple[int, int]], tokens: int, cutoff: float = 0.0
) -> list[tuple[int, int]]:
    """The best-scoring windows (score > 0, and at least ``cutoff`` times the best window's) whose union
    stays within ``tokens`` (a window longer than what is left gives its middle part), merged where they
    touch or overlap, in text order."""
    if not wins:
        return []
    floor = cutoff * float(scores.max())
    lo, hi = min(a for a, _ in wins), max(b for _, b in wins)
    taken = np.zeros(hi - lo, dtype=bool)
    left = tokens
    for i in sorted(range(len(wins)), key=lambda i: (-scores[i], wins[i][0])):
        if scores[i] <= 0 or scores[i] < floor or left <= 0:
            break
        a, b = wins[i]
        new = int((~taken[a - lo : b - lo]).sum())
        if new > left and b - a > left:  # a window longer than what is left: its middle part
            a += (b - a - left) // 2
            b = a + left
            new = int((~taken[a - lo : b - lo]).sum())
        if 0 < new <= left:
            taken[a - lo : b - lo] = True
            left -= new
    spans, start = [], None
    for i, flag in enumerate(taken.tolist() + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append((lo + start, lo + i))
            start = None
    return spans


def has_text_positions(cache: NuggetCache) -> bool:
    """Whether the cache's entries carry their text positions (it is numbered by text position)."""
    return cache.position_mode == "original"


@torch.no_grad()
def attention_mass(
    model: Nugget2DModel, cache: NuggetCache, prompt: list[int], length: int, lo: int, hi: int
) -> np.ndarray:
    """The attention ``prompt``'s tokens give, read over a fork of ``cache``, to the kept entries of text
    positions ``lo``..``hi``, per text position ``(length,)``: each layer's KV heads vote with what they
    give those entries, normalised to 1, so every (layer, head) counts alike. ``cache`` is unchanged."""
    fork = cache.fork()
    seen = HeadAttentionReceived(len(prompt))
    ids = torch.tensor([prompt], device=model.device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    fork.observer = seen
    try:
        adapter = DECODER if model.config.decoder_adapter else None
        model.forward_pass(fork, ids, mask, adapter, model.base, score=False)
    finally:
        fork.observer = None
    mass = torch.zeros(length, dtype=torch.float64)
    for layer, received in zip(fork.layers, seen.layers(len(fork.layers))):
        attention = received[0].double().cpu()  # (Hkv, K)
        positions = layer.positions[0].cpu()
        positions = positions.expand(attention.shape[0], -1) if positions.dim() == 1 else positions
        valid = (layer.bias[0] > MASKED / 2).cpu().expand(attention.shape[0], -1)
        inside = valid & (positions >= lo) & (positions < hi)
        attention = attention.masked_fill(~inside, 0.0)
        attention = attention / attention.sum(dim=-1, keepdim=True).clamp(min=1e-12)
        mass.index_add_(0, positions[inside].long(), attention[inside])
    return mass.numpy()


def plan(
    look,
    model: Nugget2DModel,
    tokenizer,
    cache: NuggetCache,
    ids: np.ndarray,
    start: int,
    stop: int,
    prompt: list[int],
    question: str,
) -> list[tuple[int, int]]:
    """The spans (text positions) ``look`` reads back for ``prompt`` over ``cache``: windows of the
    text between ``start`` and ``stop`` (after the sinks; before the raw window, or to the end where the
    answer does not hold it), scored by the selector."""
    wins = windows(start, stop, look.span)
    if not wins:
        return []
    view = Candidates(ids, wins, question, tokenizer)
    if look.selector in READS_CACHE:
        if has_text_positions(cache):
            view.mass = attention_mass(model, cache, prompt, len(ids), start, stop)
        elif look.selector == "attention":
            raise ValueError(
                "the attention look-back selector maps kept entries to the text by their text positions, which a "
                "cache numbered by entries (positions='cache', or 'auto' past the model's window) no longer holds; "
                "use the bm25 selector"
            )
        else:
            _log.warning("look-back: this cache is numbered by entries; the hybrid selector scores by BM25 alone")
    return choose_spans(select_scores(look, view), wins, look.tokens, look.cutoff)
