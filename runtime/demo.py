"""``nugget2d demo``: long-document QA over a bundled book several times longer than the model's
native window, streamed into a bounded nugget cache; answers stream as they are generated, and the
memory and time saved against a full KV cache are printed at the end."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from nugget2d.compress import Nugget2DConfig

from .generation import GenerationSettings
from .loading import load_nugget2d
from .session import StreamingSession, StreamSettings
from .texts import bundled_text

QUESTIONS = (
    "Who are the people talking in this book, and what are they doing?",
    "What fish does the book teach how to catch?",
)
ANSWER_ROOM = 512  # tokens a full KV cache keeps free for the question and the answer


@dataclass
class DemoRun:
    """What one cache gave: what it read, its size, rates and its answers."""

    label: str
    tokens_read: int
    cache_tokens: int
    cache_bytes: int
    full_kv_bytes: int
    ingest_tokens_per_s: float
    decode_tokens_per_s: float
    answers: list[str]

    @property
    def answer(self) -> str:
        """The first answer."""
        return self.answers[0]


def run_demo(
    context_tokens: int | None = None,
    ratio: float = 0.1,
    max_new_tokens: int = 60,
    model: str | None = None,
    adapter: str | None = None,
    budget: int = 2048,
    attention: str = "sdpa",
    questions: Sequence[str] = QUESTIONS,
    out=sys.stdout,
) -> list[DemoRun]:
    """Stream the bundled book (or its first ``context_tokens``) into a nugget2d cache of ``budget``
    entries and answer ``questions`` over it; answer the first one with a full KV cache of as much
    of the book as fits the native window; print the answers, a size/speed table and the savings.
    Returns ``[full KV run, nugget2d run]``."""
    nugget_model, tokenizer = load_nugget2d(model, adapter, Nugget2DConfig(ratio=ratio), attention)
    window = int(nugget_model.base.config.max_position_embeddings)
    ids = tokenizer(bundled_text(), add_special_tokens=False, verbose=False).input_ids
    ids = ids[:context_tokens] if context_tokens else ids
    source = nugget_model.adapter_source
    adapter_line = "untrained (zero LoRA, random scorer)" if source == "untrained" else f"trained ({source})"
    print(
        f"Book: Izaak Walton, The Compleat Angler (1653, public domain, bundled): {len(ids):,} tokens, "
        f"{len(ids) / window:.1f}x the model's native window ({window:,}).\nAdapter: {adapter_line}; "
        f"cache budget {budget} entries, ratio {ratio}.",
        file=out,
    )
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    compressed = StreamSettings(ratio=ratio, budget=budget, recent=min(512, budget // 4), segment=256)
    nuggets = _run("nugget2d", nugget_model, tokenizer, compressed, ids, questions, settings, out)
    prefix = ids[: max(1, min(len(ids), window - ANSWER_ROOM))]
    full_shape = StreamSettings(ratio=1.0, budget=len(prefix) + ANSWER_ROOM + 1, recent=len(prefix), sinks=0)
    full = _run("full KV", nugget_model, tokenizer, full_shape, prefix, questions[:1], settings, out)
    _print_summary(full, nuggets, out)
    return [full, nuggets]


def _run(label, model, tokenizer, shape, ids, questions, settings, out) -> DemoRun:
    session = StreamingSession(model, tokenizer, shape, progress=True)
    print(f"\n[{label}] reading {len(ids):,} tokens ...", file=out, flush=True)
    session.ingest(tokenizer.decode(ids))
    answers = []
    for question in questions:
        print(f"[{label}] Q: {question}\n[{label}] A: ", end="", file=out, flush=True)
        pieces = []
        for piece in session.ask(question, settings):
            print(piece, end="", file=out, flush=True)
            pieces.append(piece)
        print(file=out)
        answers.append("".join(pieces))
    stats = session.stats
    return DemoRun(
        label,
        stats.tokens_ingested,
        stats.cache_tokens,
        stats.cache_bytes,
        stats.full_kv_bytes,
        stats.ingest_tokens_per_s,
        stats.decode_tokens_per_s,
        answers,
    )


def _print_summary(full: DemoRun, nuggets: DemoRun, out) -> None:
    print(f"\n{'cache':<10}{'read':>9}{'entries':>9}{'MiB':>9}{'ingest tok/s':>14}{'decode tok/s':>14}", file=out)
    for run in (full, nuggets):
        print(
            f"{run.label:<10}{run.tokens_read:>9,}{run.cache_tokens:>9,}{run.cache_bytes / 2**20:>9.1f}"
            f"{run.ingest_tokens_per_s:>14.0f}{run.decode_tokens_per_s:>14.1f}",
            file=out,
        )
    whole = nuggets.full_kv_bytes
    print(
        f"\nMemory: nugget2d holds everything it read in {nuggets.cache_bytes / 2**20:.1f} MiB; a full KV cache of the "
        f"same text would need {whole / 2**20:,.1f} MiB ({whole / max(nuggets.cache_bytes, 1):.1f}x more, "
        f"{1 - nuggets.cache_bytes / whole:.1%} saved).",
        file=out,
    )
    if full.decode_tokens_per_s and nuggets.decode_tokens_per_s:
        print(
            f"Time: nugget2d decodes at {nuggets.decode_tokens_per_s:.1f} tok/s over all "
            f"{nuggets.tokens_read:,} tokens, "
            f"full KV at {full.decode_tokens_per_s:.1f} tok/s over {full.tokens_read:,} tokens "
            f"({nuggets.decode_tokens_per_s / full.decode_tokens_per_s:.2f}x)"
            + (", and it cannot read the rest within its window." if full.tokens_read < nuggets.tokens_read else "."),
            file=out,
        )
