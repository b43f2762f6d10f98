"""``nugget2d bench speed``: prefill time, per-token decode time, cache size and peak memory of every
method at the same cache budget, measured interleaved and repeated in one run (DESIGN §8).

Each configuration is one :class:`StreamingSession` that reads ``context`` tokens, then answers a
short prompt with exactly ``decode_tokens + 1`` greedy tokens through the one generation loop
(EOS ignored); the per-token times are the gaps between consecutive tokens after the first (which
also carries the prompt).
"""

from __future__ import annotations

import gc
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .bench_common import (
    CacheShape,
    announce_adapter,
    check_contexts,
    check_methods,
    check_ratios,
    configurations,
    load_token_texts,
    machine_info,
    median,
    write_results,
)
from .bench_plots import plot_speed
from .generation import GenerationSettings
from .resources import peak_rss_since_reset_bytes, reset_peak_rss
from .session import StreamingSession

PROMPT = "\n\nQuestion: What happens next in this text?\nAnswer:"


@dataclass
class SpeedRun:
    """One measurement of one configuration."""

    prefill_s: float
    decode_s: list[float]
    cache_tokens: int
    cache_bytes: int
    full_kv_bytes: int
    peak_rss_bytes: int
    peak_cuda_bytes: int | None


@dataclass
class SpeedOptions:
    """What ``bench speed`` measures; validated on construction."""

    methods: list[str]
    ratios: list[float]
    contexts: list[int]
    repeats: int = 2
    decode_tokens: int = 64
    seed: int = 0
    inputs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_methods(self.methods)
        check_ratios(self.ratios)
        check_contexts(self.contexts, minimum=16)
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.decode_tokens < 1:
            raise ValueError(f"--decode-tokens must be >= 1, got {self.decode_tokens}")


def context_ids(texts: list[list[int]], length: int) -> tuple[list[int], bool]:
    """The first ``length`` tokens of the texts joined; the texts repeat when too short (flagged True)."""
    joined = [t for ids in texts for t in ids]
    if not joined:
        raise ValueError("the input texts hold no tokens")
    repeated = len(joined) < length
    while len(joined) < length:
        joined = joined + joined
    return joined[:length], repeated


def measure(model, tokenizer, shape: CacheShape, ids: list[int], prompt: list[int], decode_tokens: int) -> SpeedRun:
    """Read ``ids`` into a session of ``shape``, then time ``decode_tokens`` single-token decode steps."""
    settings = shape.settings()
    gc.collect()
    reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    session = StreamingSession(model, tokenizer, settings, chat=False)
    started = time.perf_counter()
    session.ingest_ids(ids, final=True)
    prefill = time.perf_counter() - started
    gaps, last = [], time.perf_counter()
    for _ in session.ask_ids(prompt, GenerationSettings(max_new_tokens=decode_tokens + 1, ignore_eos=True)):
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    stats = session.stats
    return SpeedRun(
        prefill_s=prefill,
        decode_s=gaps[1:],
        cache_tokens=int(session.cache.entry_counts()[0]),
        cache_bytes=session.cache.nbytes,
        full_kv_bytes=stats.full_kv_bytes,
        peak_rss_bytes=peak_rss_since_reset_bytes(),
        peak_cuda_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    )


def run_speed(model, tokenizer, options: SpeedOptions, out_dir: str | Path, adapter: str | None = None) -> Path:
    """Measure every configuration ``repeats`` times, interleaved (a fresh shuffled order each round),
    and write ``out_dir/speed.json`` plus ``speed.png``; return the JSON path."""
    announce_adapter(adapter)
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    texts, names = load_token_texts(tokenizer, options.inputs)
    prompt = tokenizer(PROMPT, add_special_tokens=False).input_ids
    reserve = len(prompt) + options.decode_tokens + 1
    configs = configurations(options.methods, options.ratios, options.contexts)
    shapes = {config: CacheShape(*config, reserve=reserve) for config in configs}
    for shape in shapes.values():
        shape.settings()  # refuse impossible configurations before measuring anything
    inputs = {context: context_ids(texts, context) for context in options.contexts}
    warm = CacheShape("nugget2d", 0.5, 64, reserve)
    measure(model, tokenizer, warm, inputs[min(options.contexts)][0][:64], prompt, 2)  # first-call overheads
    runs: dict[tuple, list[SpeedRun]] = {config: [] for config in configs}
    order = list(configs)
    rng = random.Random(options.seed)
    with tqdm(total=len(configs) * options.repeats, desc="bench speed", unit="run", file=sys.stderr) as bar:
        for _ in range(options.repeats):
            rng.shuffle(order)
            for config in order:
                bar.set_postfix_str(f"{config[0]} r={config[1]} c={config[2]}")
                ids = inputs[config[2]][0]
                runs[config].append(measure(model, tokenizer, shapes[config], ids, prompt, options.decode_tokens))
                bar.update()
    records = [_record(config, shapes[config], runs[config], inputs[config[2]][1]) for config in configs]
    extra = {
        "load_average_at_start": load_at_start,
        "benchmark": "speed",
        "inputs": names,
        "prompt_tokens": len(prompt),
        "decode_tokens": options.decode_tokens,
        "repeats": options.repeats,
    }
    path = write_results(out_dir, "speed", machine_info(model, adapter), records, extra)
    plot_speed(records, Path(out_dir) / "speed.png", title=_title(model, adapter))
    return path


def _record(config: tuple, shape: CacheShape, runs: list[SpeedRun], repeated_text: bool) -> dict:
    method, ratio, context = config
    settings = shape.settings()
    record = {
        "method": method,
        "ratio": ratio,
        "context": context,
        "cache_tokens": runs[-1].cache_tokens,
        "cache_bytes": runs[-1].cache_bytes,
        "full_kv_bytes": runs[-1].full_kv_bytes,
        "prefill_s": median([r.prefill_s for r in runs]),
        "decode_ms_per_token": 1000 * median([t for r in runs for t in r.decode_s]),
        "peak_rss_bytes": max(r.peak_rss_bytes for r in runs),
        "budget": settings.budget,
        "history_entries": shape.history,
        "recent": settings.recent,
        "segment": settings.segment,
        "sinks": settings.sinks,
        "repeats": len(runs),
        "decode_tokens_timed": sum(len(r.decode_s) for r in runs),
        "prefill_s_runs": [r.prefill_s for r in runs],
        "decode_ms_per_token_runs": [1000 * median(r.decode_s) for r in runs],
        "text_repeated": repeated_text,
    }
    if runs[-1].peak_cuda_bytes is not None:
        record["peak_cuda_bytes"] = max(r.peak_cuda_bytes for r in runs)
    return record


def _title(model, adapter: str | None) -> str:
    state = "untrained adapter" if adapter in (None, "", "none") else f"adapter {Path(adapter).name}"
    return f"{Path(str(model.config.base_model)).name}, {state}"
