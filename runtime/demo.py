"""``nugget2d demo``: questions about a bundled book, read into a bounded nugget cache, each answered
beside the answer of a full KV cache of the same text (when the text fits the model's window), with
the memory and time each took.

By default the demo reads the book's first :data:`DEMO_TOKENS` tokens, so that on a 2-core CPU the
first answer comes within minutes (``benchmarks/demo/README.md``); ``--full-book`` reads all of it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from nugget2d.compress import Nugget2DConfig

from .generation import GenerationSettings
from .loading import load_nugget2d
from .session import CacheConfig, StreamingSession
from .texts import bundled_text

#: Questions whose answers are in the book's first 1,000 tokens (title page and preface: Walton, 18 pence,
#: Richard Marriot).
QUESTIONS = (
    "Who wrote this book?",
    "What did the first edition of the book cost?",
    "Who printed and sold the first edition?",
)
#: Tokens of the book the demo reads by default: on this project's shared 2-core CPU, at a load average
#: of 9, 6,144 tokens gave the first answer after 5.6 minutes (benchmarks/demo/README.md); 4,096 keep the
#: first answer within 5 minutes and the whole demo within 8 there.
DEMO_TOKENS = 4096
#: Cache entries a full KV cache keeps for a question's chat template beside the question and the answer.
QUESTION_ROOM = 128
#: Greedy answers that do not loop: with the default model, greedy answers looped in 1 of 5 and took 43 s
#: on average; these in 0 of 5 and 21 s (benchmarks/demo/answers.json).
DEMO_GENERATION = GenerationSettings(max_new_tokens=60, repetition_penalty=1.1, no_repeat_ngram=4, stop=("\n\n",))


@dataclass
class DemoRun:
    """What one cache gave: what it read, its size, times and its answers (one per question)."""

    label: str
    tokens_read: int
    cache_tokens: int
    cache_bytes: int
    ingest_seconds: float
    answers: list[str] = field(default_factory=list)
    answer_seconds: list[float] = field(default_factory=list)

    @property
    def answer(self) -> str:
        """The first answer."""
        return self.answers[0]

    @property
    def ingest_tokens_per_s(self) -> float:
        return self.tokens_read / self.ingest_seconds if self.ingest_seconds else 0.0


def idle_threads() -> int:
    """CPU threads to use now: every core, or one when other jobs already keep every core busy (the
    1-minute load average at least the core count). On this project's shared 2-core CPU at a load of 10,
    the default model read 6.8 tokens/s with two threads and 33 with one (benchmarks/demo/README.md)."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return cores if load < cores else 1


def demo_cache_config(budget: int = 2048, ratio: float = 0.1) -> CacheConfig:
    """The nugget cache the demo reads the book into: ``budget`` entries, a quarter of them (at most
    512) the recent window, segments of 256 tokens (fewer for budgets under 1024)."""
    quarter = budget // 4
    return CacheConfig(ratio=ratio, budget=budget, recent=min(512, quarter), segment=min(256, quarter))


def full_cache_config(tokens: int, answer_tokens: int) -> CacheConfig:
    """A full KV cache (the unmodified model's keys and values, none dropped) for ``tokens`` tokens, a
    question's template and ``answer_tokens`` more (the question and the answer)."""
    recent = tokens + QUESTION_ROOM + answer_tokens
    return CacheConfig(ratio=1.0, budget=4 + recent + 256 + 1, recent=recent, segment=256, sinks=4, policy="full")


def run_demo(
    context_tokens: int | None = DEMO_TOKENS,
    ratio: float = 0.1,
    max_new_tokens: int | None = None,
    model: str | None = None,
    adapter: str | None = None,
    budget: int = 2048,
    attention: str = "sdpa",
    questions: Sequence[str] = QUESTIONS,
    out=sys.stdout,
    settings: GenerationSettings | None = None,
    text: str | None = None,
) -> list[DemoRun]:
    """Read the bundled book (its first ``context_tokens``; ``None`` or 0: all of it), or ``text``, into a
    nugget cache of ``budget`` entries and answer each of ``questions`` over a copy of it; then, when
    the text fits the model's window, read it into a full KV cache and answer the same questions.
    Prints the answers side by side with memory and time, and the savings. Returns the runs, nugget2d
    first (one run when the full KV cache cannot read the text)."""
    started = time.perf_counter()
    settings = settings or DEMO_GENERATION
    if max_new_tokens is not None:
        settings = dataclasses.replace(settings, max_new_tokens=max_new_tokens)
    nugget_model, tokenizer = load_nugget2d(model, adapter, Nugget2DConfig(ratio=ratio), attention)
    window = int(nugget_model.base.config.max_position_embeddings)
    ids = tokenizer(text or bundled_text(), add_special_tokens=False, verbose=False).input_ids
    whole = len(ids)
    ids = ids[:context_tokens] if context_tokens else ids
    source = nugget_model.adapter_source
    adapter_line = "untrained (zero LoRA, random scorer)" if source == "untrained" else f"trained ({source})"
    name = "the given text" if text else "Izaak Walton, The Compleat Angler (1653, public domain, bundled)"
    part = f"its first {len(ids):,} of {whole:,} tokens" if len(ids) < whole else f"all {whole:,} tokens"
    print(
        f"Book: {name}: {part}, {len(ids) / window:.1f}x the model's native window ({window:,}).\n"
        f"Adapter: {adapter_line}; nugget cache of {budget:,} entries, ratio {ratio}.",
        file=out,
    )
    if not ids or not questions or any(not q.strip() for q in questions):
        raise ValueError("the demo needs a text of at least one token and non-empty questions")
    longest = max(len(tokenizer(q, add_special_tokens=False).input_ids) for q in questions)
    config = demo_cache_config(budget, ratio)
    nuggets = _read("nugget2d", nugget_model, tokenizer, config, ids, out, questions, settings)
    print(f"[nugget2d] first answers ({time.perf_counter() - started:.0f} s since start):", file=out, flush=True)
    for question in questions:
        print(f"\nQ: {question}", file=out, flush=True)
        _answer(nuggets, question, settings, out)
    runs = [nuggets.run]
    answer_room = QUESTION_ROOM + longest + settings.max_new_tokens
    if len(ids) + answer_room > window:
        print(
            f"\n[full KV] not run: {len(ids):,} tokens and the answer do not fit the model's {window:,}-token window "
            f"(it never saw positions past it); a full KV cache of them would need "
            f"{nugget_model.full_kv_bytes(len(ids)) / 2**20:,.1f} MiB.",
            file=out,
        )
    else:
        config = full_cache_config(len(ids), longest + settings.max_new_tokens)
        full = _read("full KV", nugget_model, tokenizer, config, ids, out, questions, settings)
        for index, question in enumerate(questions):
            print(f"\nQ: {question}", file=out)
            _show(nuggets.run, index, out)
            _answer(full, question, settings, out)
        runs.append(full.run)
    _print_summary(runs, nugget_model.full_kv_bytes(len(ids)), out)
    print(f"\nDemo took {time.perf_counter() - started:.0f} s in all (model loading included).", file=out)
    return runs


@dataclass
class _Reader:
    """A session that has read the text, and the run it records."""

    session: StreamingSession
    run: DemoRun


def _read(label: str, model, tokenizer, config: CacheConfig, ids: list[int], out, questions, settings) -> _Reader:
    """A session of ``config`` that has read ``ids``; ``ValueError`` before reading if a question and its
    answer cannot fit the cache."""
    session = StreamingSession(model, tokenizer, config, progress=True)
    for question in questions:
        session.prompt_ids(question, settings)
    print(f"\n[{label}] reading {len(ids):,} tokens ...", file=out, flush=True)
    session.ingest(tokenizer.decode(ids))
    stats = session.stats
    run = DemoRun(label, stats.tokens_ingested, stats.cache_tokens, stats.cache_bytes, stats.ingest_seconds)
    return _Reader(session, run)


def _answer(reader: _Reader, question: str, settings: GenerationSettings, out) -> None:
    """Stream the answer to ``question`` over a copy of the read text (each question sees the text alone)."""
    run = reader.run
    print(f"  {_head(run)}: ", end="", file=out, flush=True)
    started, pieces = time.perf_counter(), []
    for piece in reader.session.fork().ask(question, settings):
        print(piece, end="", file=out, flush=True)
        pieces.append(piece)
    run.answer_seconds.append(time.perf_counter() - started)
    run.answers.append("".join(pieces).strip())
    print(f"  [{run.answer_seconds[-1]:.1f} s]", file=out, flush=True)


def _show(run: DemoRun, index: int, out) -> None:
    print(f"  {_head(run)}: {run.answers[index]}  [{run.answer_seconds[index]:.1f} s]", file=out)


def _head(run: DemoRun) -> str:
    return f"{run.label:<8} ({run.cache_tokens:,} entries, {run.cache_bytes / 2**20:.1f} MiB)"


def _print_summary(runs: list[DemoRun], full_kv_bytes: int, out) -> None:
    print(f"\n{'cache':<10}{'read':>9}{'entries':>9}{'MiB':>8}{'read s':>8}{'tok/s':>7}{'answer s':>10}", file=out)
    for run in runs:
        print(
            f"{run.label:<10}{run.tokens_read:>9,}{run.cache_tokens:>9,}{run.cache_bytes / 2**20:>8.1f}"
            f"{run.ingest_seconds:>8.0f}{run.ingest_tokens_per_s:>7.0f}"
            f"{sum(run.answer_seconds) / max(len(run.answer_seconds), 1):>10.1f}",
            file=out,
        )
    nuggets = runs[0]
    full_bytes = runs[1].cache_bytes if len(runs) > 1 else full_kv_bytes
    print(
        f"\nMemory: nugget2d holds the {nuggets.tokens_read:,} tokens it read in "
        f"{nuggets.cache_bytes / 2**20:.1f} MiB; "
        f"a full KV cache of them {'takes' if len(runs) > 1 else 'would take'} {full_bytes / 2**20:,.1f} MiB "
        f"({full_bytes / max(nuggets.cache_bytes, 1):.1f}x more, {1 - nuggets.cache_bytes / full_bytes:.0%} saved).",
        file=out,
    )
