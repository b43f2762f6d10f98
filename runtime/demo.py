"""``nugget2d demo``: compress a passage of a bundled book and continue it over the nuggets."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from nugget2d.compress import Nugget2DConfig, NuggetCache

from .generation import GenerationSettings, TextDeltas, generate_tokens
from .loading import load_nugget2d
from .texts import bundled_text


@dataclass
class DemoRun:
    """What one cache gave: its size, the time to build it and to decode, and the continuation."""

    label: str
    cache_tokens: int
    cache_bytes: int
    prefill_s: float
    decode_ms_per_token: float
    text: str


def run_demo(
    context_tokens: int = 1024,
    ratio: float = 0.1,
    max_new_tokens: int = 40,
    model: str | None = None,
    adapter: str | None = None,
    out=sys.stdout,
) -> list[DemoRun]:
    """Compress the first ``context_tokens`` of the bundled book with full KV and with nuggets,
    continue the text greedily over each, print the streamed continuations and a size table."""
    nugget_model, tokenizer = load_nugget2d(model, adapter, Nugget2DConfig(ratio=ratio))
    text = bundled_text()
    start = text.find("CHAPTER I")
    ids = tokenizer(text[max(start, 0) :], return_tensors="pt").input_ids[0, :context_tokens]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, eos_token_ids=(tokenizer.eos_token_id,))
    print(f"Passage: {len(ids)} tokens of Walton's The Compleat Angler (bundled, public domain).", file=out)
    print(f"...{tokenizer.decode(ids[-40:])}", file=out)
    runs = []
    for label, keep in (("full KV", 1.0), (f"nugget2d r={ratio}", ratio)):
        began = time.perf_counter()
        with torch.no_grad():
            cache = nugget_model.compress(ids[:-1], ratio=keep)
        prefill = time.perf_counter() - began
        runs.append(_continue(nugget_model, tokenizer, cache, ids[-1:], settings, label, prefill, out))
    _print_table(runs, out)
    return runs


def _continue(model, tokenizer, cache: NuggetCache, prompt, settings, label, prefill, out) -> DemoRun:
    print(f"\n[{label}] continuation: ", end="", file=out, flush=True)
    deltas = TextDeltas(tokenizer)
    began, count = time.perf_counter(), 0
    for token in generate_tokens(model, cache, prompt, settings):
        print(deltas.push(token), end="", file=out, flush=True)
        count += 1
    elapsed = time.perf_counter() - began
    print(file=out)
    return DemoRun(
        label, int(cache.entry_counts()[0]), cache.nbytes, prefill, 1000 * elapsed / max(count, 1), deltas.text()
    )


def _print_table(runs: list[DemoRun], out) -> None:
    full = runs[0]
    print(f"\n{'cache':<20}{'entries':>9}{'bytes':>14}{'vs full':>9}{'prefill s':>11}{'decode ms/tok':>15}", file=out)
    for run in runs:
        share = run.cache_bytes / full.cache_bytes
        print(
            f"{run.label:<20}{run.cache_tokens:>9}{run.cache_bytes:>14,}{share:>9.3f}{run.prefill_s:>11.2f}"
            f"{run.decode_ms_per_token:>15.1f}",
            file=out,
        )
