"""``nugget2d demo``: stream a passage of a bundled book into a bounded nugget cache, ask about it,
and compare with a full KV cache of the same passage."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from nugget2d.compress import Nugget2DConfig

from .generation import GenerationSettings
from .loading import load_nugget2d
from .session import StreamingSession, StreamSettings
from .texts import bundled_text

QUESTION = "What is this text about? Answer in two sentences."


@dataclass
class DemoRun:
    """What one cache gave: its size, rates and the answer."""

    label: str
    cache_tokens: int
    cache_bytes: int
    ingest_tokens_per_s: float
    decode_tokens_per_s: float
    answer: str


def run_demo(
    context_tokens: int = 4096,
    ratio: float = 0.1,
    max_new_tokens: int = 60,
    model: str | None = None,
    adapter: str | None = None,
    budget: int = 1024,
    attention: str = "sdpa",
    out=sys.stdout,
) -> list[DemoRun]:
    """Answer :data:`QUESTION` about the first ``context_tokens`` of the bundled book, with a full KV
    cache and with a nugget2d cache of ``budget`` entries; print both answers and a size table."""
    nugget_model, tokenizer = load_nugget2d(model, adapter, Nugget2DConfig(ratio=ratio), attention)
    text = bundled_text()
    ids = tokenizer(text[text.find("_Piscator_. You are wel overtaken") :], verbose=False).input_ids[:context_tokens]
    passage = tokenizer.decode(ids)
    print(f"Passage: {len(ids)} tokens of Walton's The Compleat Angler (bundled, public domain).", file=out)
    print(f"Question: {QUESTION}", file=out)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    recent = min(256, budget // 4)
    shapes = {
        "full KV": StreamSettings(ratio=1.0, budget=len(ids) + 512, recent=len(ids), segment=256, sinks=0),
        f"nugget2d r={ratio}": StreamSettings(ratio=ratio, budget=budget, recent=recent, segment=256),
    }
    runs = []
    for label, shape in shapes.items():
        session = StreamingSession(nugget_model, tokenizer, shape, progress=True)
        session.ingest(passage)
        print(f"\n[{label}] ", end="", file=out, flush=True)
        pieces = []
        for piece in session.ask(QUESTION, settings):
            print(piece, end="", file=out, flush=True)
            pieces.append(piece)
        print(file=out)
        stats = session.stats
        runs.append(
            DemoRun(
                label,
                stats.cache_tokens,
                stats.cache_bytes,
                stats.ingest_tokens_per_s,
                stats.decode_tokens_per_s,
                "".join(pieces),
            )
        )
    _print_table(runs, out)
    return runs


def _print_table(runs: list[DemoRun], out) -> None:
    full = runs[0]
    print(f"\n{'cache':<20}{'entries':>9}{'MiB':>9}{'vs full':>9}{'ingest tok/s':>14}{'decode tok/s':>14}", file=out)
    for run in runs:
        share = run.cache_bytes / full.cache_bytes
        print(
            f"{run.label:<20}{run.cache_tokens:>9}{run.cache_bytes / 2**20:>9.1f}{share:>9.3f}"
            f"{run.ingest_tokens_per_s:>14.0f}{run.decode_tokens_per_s:>14.1f}",
            file=out,
        )
