"""Look-back in ``bench quality``: each question asked of one read session with every look-back variant.

A variant is ``(tokens, selector)``; ``(0, None)`` is the session as it answers without look-back. The
context is read once per sample and every variant answers on a fork of that session (look-back leaves
the session's cache as it was, and a plain answer changes only the fork), so the variants differ only
in what they read back. Each answer is timed (from the question to the last token: making room,
choosing and reading spans, reading the question, generating), with the largest cache it read.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable

from .lookback import LookBack, check_lookback, check_lookback_choice
from .lookback_select import has_text_positions
from .session import StreamingSession

Variant = tuple[int, str | None]
_log = logging.getLogger("nugget2d")


def check_lookback_options(
    lookbacks: list[int], selectors: list[str], span: int, placement: str = "auto", cutoff: float = 0.0
) -> None:
    """``ValueError`` for a negative look-back or a choice :class:`LookBack` refuses (selector, span,
    placement, cutoff), before any sample is read."""
    for tokens in lookbacks:
        check_lookback(tokens)
    for name in selectors:
        check_lookback_choice(name, span, placement, cutoff)


def variants(method: str, lookbacks: list[int], selectors: list[str]) -> list[Variant]:
    """The variants ``method`` answers with: without look-back when 0 is asked (and always for ``full``,
    which keeps the whole text), then each look-back size with each selector."""
    plain: list[Variant] = [(0, None)] if 0 in lookbacks or method == "full" else []
    if method == "full":
        return plain
    return plain + [(tokens, name) for tokens in lookbacks if tokens > 0 for name in selectors]


def answer_variants(
    session: StreamingSession,
    ask: Callable[[StreamingSession, LookBack], Iterable],
    wanted: list[Variant],
    answers: tuple[str, ...],
    shape: LookBack | None = None,
    render: Callable[[list], str] = "".join,
) -> list[dict]:
    """Every variant's answer to one question of ``session`` (which has read the context): ``ask(fork,
    look)`` streams the answer's pieces on a fork, ``render`` makes the reply of them; ``answers`` are what
    the oracle selector looks for; ``shape`` gives every variant its placement, span and cutoff (default:
    :class:`LookBack`'s). Per variant: the reply, seconds to the first piece and to the last, the tokens
    generated, the largest cache bytes the answer read, tokens read back, the spans and where they were
    read (the placement, ``auto`` resolved; empty without look-back). The attention
    selector is skipped (with a warning) where the cache is not numbered by text position."""
    results = []
    for tokens, selector in wanted:
        if selector == "attention" and not has_text_positions(session.cache):
            _log.warning("bench: the attention selector needs a cache numbered by text position; variant skipped")
            continue
        fork = session.fork()
        look = LookBack(tokens)
        if tokens:
            oracle = answers if selector == "oracle" else ()
            look = dataclasses.replace(shape or LookBack(), tokens=tokens, selector=selector, answers=oracle)
        generated, started = fork.stats.generated_tokens, time.perf_counter()
        pieces, first = [], None
        for piece in ask(fork, look):
            first = time.perf_counter() - started if first is None else first
            pieces.append(piece)
        seconds = time.perf_counter() - started
        stats = fork.lookback_stats
        results.append(
            {
                "variant": (tokens, selector),
                "reply": render(pieces),
                "seconds": seconds,
                "first_token_seconds": seconds if first is None else first,
                "answer_tokens": fork.stats.generated_tokens - generated,
                "peak_bytes": stats.peak_cache_bytes if tokens else fork.cache.nbytes,
                "read_tokens": stats.tokens_read,
                "spans": [list(s) for s in stats.last_spans] if tokens else [],
                "placement": stats.last_placement if tokens else "",
            }
        )
    return results


def note_answer(record: dict, acc: dict, result: dict) -> None:
    """Add one answer's time, peak bytes and look-back (and where its spans were read) to a record's sums."""
    tokens, selector = result["variant"]
    if tokens:
        record.setdefault("lookback", tokens)
        record.setdefault("lookback_selector", selector)
        placements = record.setdefault("lookback_placements", [])
        if result.get("placement") and result["placement"] not in placements:
            placements.append(result["placement"])
    acc.setdefault("answer_seconds", []).append(result["seconds"])
    if "first_token_seconds" in result:  # a press's answer is timed whole
        acc.setdefault("first_token_seconds", []).append(result["first_token_seconds"])
        acc.setdefault("answer_tokens", []).append(result["answer_tokens"])
    acc.setdefault("peak_bytes", []).append(result["peak_bytes"])
    acc.setdefault("read_tokens", []).append(result["read_tokens"])


def finish(record: dict, acc: dict) -> None:
    """Seconds per answer (and to its first token, and the tokens it generated), peak cache bytes while
    answering and tokens read back per answer, from the sums."""
    for name in ("first_token_seconds", "answer_tokens"):
        if acc.get(name):
            record[name] = sum(acc[name]) / len(acc[name])
    if "answer_seconds" in acc:
        record["seconds_per_answer"] = sum(acc["answer_seconds"]) / len(acc["answer_seconds"])
        record["peak_question_bytes"] = max(acc["peak_bytes"])
        record["lookback_read_tokens"] = sum(acc["read_tokens"]) / len(acc["read_tokens"])
