"""``nugget2d bench speed``: prefill time, per-token decode time, cache size and peak memory of every
method at the same cache budget, measured interleaved and repeated in one run (docs/design.md).

Each configuration is one :class:`StreamingSession` that reads ``context`` tokens, then answers a
short prompt with exactly ``decode_tokens + 1`` greedy tokens through the one generation loop
(EOS ignored); the per-token times are the gaps between consecutive tokens after the first (which
also carries the prompt).

``ideal`` is the limit a perfect compressor could reach: the unmodified model (transformers' own
attention, no adapter) reading the same context in the same segments (a chunked prefill) over a plain
``DynamicCache`` kept at exactly as many K/V entries per layer and KV head as nugget2d's cache at the
same ratio and context (its first and most recent tokens; quality is not the point), decoding through
the same loop. Every record then says its decode speed-up and peak-memory reduction over full KV, its
reading rate (``ingest_tokens_per_s``), and each compressing method what fraction of ``ideal``'s it
reaches (``ideal``'s time or peak over its own; its reading rate over ``ideal``'s).
"""

from __future__ import annotations

import gc
import os
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from nugget2d.compress.attention import HEAD_READS
from nugget2d.compress.hf_compat import CACHE_ARGUMENT

from .bench_common import (
    READINGS,
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
from .generation import GenerationSettings, TokenStream
from .resources import peak_rss_since_reset_bytes, reset_peak_rss
from .session import StreamingSession

PROMPT = "\n\nQuestion: What happens next in this text?\nAnswer:"
#: The reference method of ``bench speed`` alone: a plain cache as small as nugget2d's (module docstring).
IDEAL = "ideal"
#: transformers' own attention for each nugget2d backend: what ``ideal`` decodes with.
PLAIN_ATTENTION = {"eager": "eager", "sdpa": "sdpa", "flex": "flex_attention", "flash_attn": "flash_attention_2"}


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
    #: K/V pairs in use per layer and KV head once decoding ended (the mean over heads of a per-head cache).
    kv_entries_per_head: float
    prefill_tokens: int


@dataclass
class SpeedOptions:
    """What ``bench speed`` measures; validated on construction. ``threads``: torch thread counts, each
    a row of its own (empty: leave torch's setting); ``reading``: how compressing methods read the context
    (:attr:`CacheShape.reading`)."""

    methods: list[str]
    ratios: list[float]
    contexts: list[int]
    repeats: int = 2
    decode_tokens: int = 64
    seed: int = 0
    inputs: list[str] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    reading: str = "stream"

    def __post_init__(self) -> None:
        check_methods([method for method in self.methods if method != IDEAL])
        if IDEAL in self.methods and "nugget2d" not in self.methods:
            raise ValueError("ideal holds as many entries as nugget2d's cache: measure nugget2d with it")
        check_ratios(self.ratios)
        check_contexts(self.contexts, minimum=16)
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")
        if self.decode_tokens < 1:
            raise ValueError(f"--decode-tokens must be >= 1, got {self.decode_tokens}")
        if any(threads < 1 for threads in self.threads):
            raise ValueError(f"--threads must be positive, got {self.threads}")
        if self.reading not in READINGS:
            raise ValueError(f"reading must be one of {list(READINGS)}, got {self.reading!r}")


def context_ids(texts: list[list[int]], length: int) -> tuple[list[int], bool]:
    """The first ``length`` tokens of the texts joined; the texts repeat when too short (flagged True)."""
    joined = [t for ids in texts for t in ids]
    if not joined:
        raise ValueError("the input texts hold no tokens")
    repeated = len(joined) < length
    while len(joined) < length:
        joined = joined + joined
    return joined[:length], repeated


def _timed_decode(tokens: Iterator[int]) -> list[float]:
    """Seconds between consecutive tokens of ``tokens`` after the first (which also reads the prompt)."""
    gaps, last = [], time.perf_counter()
    for _ in tokens:
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    return gaps[1:]


def _start_measure() -> None:
    gc.collect()
    reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_cuda() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def _settings(decode_tokens: int) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=decode_tokens + 1, ignore_eos=True)


def measure(model, tokenizer, shape: CacheShape, ids: list[int], prompt: list[int], decode_tokens: int) -> SpeedRun:
    """Read ``ids`` into a session of ``shape``, then time ``decode_tokens`` single-token decode steps."""
    settings = shape.settings()
    _start_measure()
    session = StreamingSession(model, tokenizer, settings, chat=False)
    started = time.perf_counter()
    session.ingest_ids(ids, final=True)
    prefill = time.perf_counter() - started
    gaps = _timed_decode(session.ask_ids(prompt, _settings(decode_tokens)))
    cache = session.cache
    return SpeedRun(
        prefill_s=prefill,
        decode_s=gaps,
        cache_tokens=int(cache.entry_counts()[0]),
        cache_bytes=cache.nbytes,
        full_kv_bytes=session.stats.full_kv_bytes,
        peak_rss_bytes=peak_rss_since_reset_bytes(),
        peak_cuda_bytes=_peak_cuda(),
        kv_entries_per_head=int(cache.stored_entries()[0]) / (model.num_layers * model.num_kv_heads),
        prefill_tokens=len(ids),
    )


class PlainLM:
    """The unmodified LM over a plain transformers cache, called as :class:`TokenStream` calls a
    ``Nugget2DModel`` (``model(ids, nuggets=cache)``), so ``ideal`` decodes through the one loop."""

    def __init__(self, model) -> None:
        self.base, self.device = model.base, model.device

    def __call__(self, input_ids: torch.Tensor, nuggets: DynamicCache):
        """One forward pass of ``input_ids`` over ``nuggets`` (appended to it); logits of the last token."""
        return self.base(input_ids=input_ids, **{CACHE_ARGUMENT: nuggets}, use_cache=True, logits_to_keep=1)


@contextmanager
def unmodified(model) -> Iterator[PlainLM]:
    """The base model with transformers' own attention for ``model.attention`` and no adapter active;
    the nugget2d backend is restored after."""
    backend = model.attention
    model.use_adapter(None)
    model.base.set_attn_implementation(PLAIN_ATTENTION[backend])
    try:
        yield PlainLM(model)
    finally:
        model.set_attention(backend)


def measure_ideal(
    model, ids: list[int], entries: int, segment: int, prompt: list[int], decode_tokens: int, sinks: int = 4
) -> SpeedRun:
    """Read all of ``ids`` into a plain ``DynamicCache`` in segments of ``segment`` (a chunked prefill),
    keeping it at ``entries`` minus the prompt and the tokens decoding feeds (the first ``sinks`` and the
    most recent; so it ends holding ``entries``, as nugget2d's cache does), then time ``decode_tokens``
    decode steps of the unmodified model. Its prefill is what reading costs over a cache of that size."""
    keep = max(sinks + 1, entries - len(prompt) - decode_tokens)
    _start_measure()
    cache = DynamicCache()
    with unmodified(model) as plain, torch.no_grad():
        started = time.perf_counter()
        for start in range(0, len(ids), segment):
            plain(torch.tensor([ids[start : start + segment]], device=model.device), nuggets=cache)
            _keep_ends(cache, keep, sinks)
        prefill = time.perf_counter() - started
        stream = TokenStream(plain, cache, prompt, _settings(decode_tokens))
        gaps = _timed_decode(iter(stream))
    cache = stream.cache
    held = cache.get_seq_length()
    return SpeedRun(
        prefill_s=prefill,
        decode_s=gaps,
        cache_tokens=held,
        cache_bytes=sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)),
        full_kv_bytes=model.full_kv_bytes(len(ids) + len(prompt) + decode_tokens),
        peak_rss_bytes=peak_rss_since_reset_bytes(),
        peak_cuda_bytes=_peak_cuda(),
        kv_entries_per_head=float(held),
        prefill_tokens=len(ids),
    )


def _keep_ends(cache: DynamicCache, keep: int, sinks: int) -> None:
    """Cut every layer of ``cache`` to its first ``sinks`` and last ``keep - sinks`` entries (positions are
    not renumbered: ``ideal`` times reading and decoding, its text is not the point)."""
    for layer in cache.layers:
        if layer.keys.shape[-2] > keep:
            tail = keep - sinks
            layer.keys = torch.cat([layer.keys[:, :, :sinks], layer.keys[:, :, -tail:]], dim=-2)
            layer.values = torch.cat([layer.values[:, :, :sinks], layer.values[:, :, -tail:]], dim=-2)


def _ordered(order: list[tuple], measured: set[tuple]) -> list[tuple]:
    """``order`` with every ``ideal`` configuration moved right after its nugget2d twin until that twin
    has been measured once (its entry count is the twin's)."""
    ideals = [c for c in order if c[0] == IDEAL and _twin(c) not in measured]
    result = [c for c in order if c not in ideals]
    for config in ideals:
        result.insert(result.index(_twin(config)) + 1, config)
    return result


def _twin(config: tuple) -> tuple:
    return ("nugget2d", *config[1:])


def _threads(count: int | None) -> None:
    if count is not None:
        torch.set_num_threads(count)


def run_speed(model, tokenizer, options: SpeedOptions, out_dir: str | Path, adapter: str | None = None) -> Path:
    """Measure every configuration ``repeats`` times, interleaved (a fresh shuffled order each round),
    and write ``out_dir/speed.json`` plus ``speed.png``; return the JSON path."""
    announce_adapter(adapter)
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    texts, names = load_token_texts(tokenizer, options.inputs)
    prompt = tokenizer(PROMPT, add_special_tokens=False).input_ids
    reserve = len(prompt) + options.decode_tokens + 1
    threads = options.threads or [None]
    configs = [
        (*config, count)
        for config in configurations(options.methods, options.ratios, options.contexts)
        for count in threads
    ]
    shapes = {
        config: CacheShape(_shape_method(config[0]), *config[1:3], reserve=reserve, reading=options.reading)
        for config in configs
    }
    for shape in shapes.values():
        shape.settings()  # refuse impossible configurations before measuring anything
    inputs = {context: context_ids(texts, context) for context in options.contexts}
    warm = CacheShape("nugget2d", 0.5, 64, reserve)
    measure(model, tokenizer, warm, inputs[min(options.contexts)][0][:64], prompt, 2)  # first-call overheads
    if IDEAL in options.methods:
        measure_ideal(model, inputs[min(options.contexts)][0][:64], 48, 16, prompt, 2)
    runs: dict[tuple, list[SpeedRun]] = {config: [] for config in configs}
    order = list(configs)
    rng = random.Random(options.seed)
    with tqdm(total=len(configs) * options.repeats, desc="bench speed", unit="run", file=sys.stderr) as bar:
        for _ in range(options.repeats):
            rng.shuffle(order)
            for config in _ordered(order, {c for c, done in runs.items() if done}):
                method, ratio, context, count = config
                bar.set_postfix_str(f"{method} r={ratio} c={context}" + (f" t={count}" if count else ""))
                _threads(count)
                ids = inputs[context][0]
                if method == IDEAL:
                    entries = round(runs[_twin(config)][0].kv_entries_per_head)
                    settings = shapes[config].settings()
                    run = measure_ideal(
                        model, ids, entries, settings.segment, prompt, options.decode_tokens, settings.sinks
                    )
                else:
                    run = measure(model, tokenizer, shapes[config], ids, prompt, options.decode_tokens)
                runs[config].append(run)
                bar.update()
    records = compare([_record(c, shapes[c], runs[c], inputs[c[2]][1]) for c in configs])
    extra = {
        "load_average_at_start": load_at_start,
        "benchmark": "speed",
        "inputs": names,
        "prompt_tokens": len(prompt),
        "decode_tokens": options.decode_tokens,
        "repeats": options.repeats,
        "reading": options.reading,
        "ideal_attention": PLAIN_ATTENTION[model.attention] if IDEAL in options.methods else None,
        "packed_layer_read": HEAD_READS[model.attention],
    }
    path = write_results(out_dir, "speed", machine_info(model, adapter), records, extra)
    plot_speed(records, Path(out_dir) / "speed.png", title=_title(model, adapter))
    return path


def _shape_method(method: str) -> str:
    """The method whose cache shape (budget, segment) a configuration reads with: ``ideal`` nugget2d's."""
    return "nugget2d" if method == IDEAL else method


def _record(config: tuple, shape: CacheShape, runs: list[SpeedRun], repeated_text: bool) -> dict:
    method, ratio, context, threads = config
    settings = shape.settings()
    record = {
        "method": method,
        "ratio": ratio,
        "context": context,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "cache_tokens": runs[-1].cache_tokens,
        "kv_entries_per_head": runs[-1].kv_entries_per_head,
        "cache_bytes": runs[-1].cache_bytes,
        "full_kv_bytes": runs[-1].full_kv_bytes,
        "prefill_s": median([r.prefill_s for r in runs]),
        "prefill_tokens": runs[-1].prefill_tokens,
        "ingest_tokens_per_s": runs[-1].prefill_tokens / median([r.prefill_s for r in runs]),
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


#: What :func:`compare` relates between methods: (measured key, key of the gain over full KV, key of the
#: fraction of ``ideal``'s gain). Gains are full KV's value over the method's (higher is better).
GAINS = (
    ("decode_ms_per_token", "decode_speedup_vs_full", "fraction_of_ideal_speedup"),
    ("peak_rss_bytes", "peak_rss_reduction_vs_full", "fraction_of_ideal_rss_reduction"),
    ("peak_cuda_bytes", "peak_cuda_reduction_vs_full", "fraction_of_ideal_cuda_reduction"),
)


def compare(records: list[dict]) -> list[dict]:
    """Add to each record its gains over full KV at the same context and threads, and for a compressing
    method its fraction of ``ideal``'s gain at the same ratio (``ideal``'s value over its own); returns them."""
    by_key = {(r["method"], r["ratio"], r["context"], r["threads"]): r for r in records}
    for record in records:
        full = by_key.get(("full", 1.0, record["context"], record["threads"]))
        ideal = by_key.get((IDEAL, record["ratio"], record["context"], record["threads"]))
        for key, gain, fraction in GAINS:
            if record.get(key) is None:
                continue
            if full is not None and full.get(key) is not None:
                record[gain] = full[key] / record[key]
            if ideal is not None and ideal.get(key) is not None and record["method"] not in ("full", IDEAL):
                record[fraction] = ideal[key] / record[key]
        if ideal is not None and "ingest_tokens_per_s" in ideal and record["method"] not in ("full", IDEAL):
            record["fraction_of_ideal_ingest"] = record["ingest_tokens_per_s"] / ideal["ingest_tokens_per_s"]
    return records


def _title(model, adapter: str | None) -> str:
    state = "untrained adapter" if adapter in (None, "", "none") else f"adapter {Path(adapter).name}"
    return f"{Path(str(model.config.base_model)).name}, {state}"
