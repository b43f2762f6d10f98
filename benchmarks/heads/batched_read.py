"""Decode time of the ways to read a packed layer's ragged KV heads, interleaved in one process: today's
Python loop over heads (``loop``), heads bucketed by length with one padded kernel call per bucket
(``buckets:COST``, COST the padded slots one more call is worth), every head of a layer in one padded
call (``padded``) and the layer rebuilt whole with every masked slot (``whole``), for each backend.

Each cache is what a ``bench speed`` session holds after reading CONTEXT tokens of the bundled book at
r = 0.1 (per-head cache of the adapter given, the shipped one by default); a decode step is one forward
pass of one token over it. Each step of a round runs every (backend, read) pair once, in a fresh shuffled
order (``--steps`` steps per round); the medians and every round's go to the JSON, with the caches' head
lengths.

Usage (repository root):
  OMP_NUM_THREADS=1 python benchmarks/heads/batched_read.py --out benchmarks/heads/batched/cpu.json \\
      --contexts 2048,8192,16384,32768 --backends eager,sdpa
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

from nugget2d.compress import attention as attention_module
from nugget2d.compress.hf_compat import returned_cache
from nugget2d.runtime.bench_common import CacheShape, load_token_texts, machine_info
from nugget2d.runtime.bench_speed import context_ids
from nugget2d.runtime.loading import load_nugget2d
from nugget2d.runtime.session import StreamingSession

CANDIDATES = "loop,buckets:256,buckets:1024,buckets:4096,padded,whole"


def read_mode(candidate: str) -> tuple[str, float]:
    """``(HEAD_READS value, CALL_COST value)`` of a candidate name."""
    if candidate == "padded":
        return "buckets", float("inf")
    if candidate.startswith("buckets:"):
        return "buckets", float(candidate.split(":", 1)[1])
    if candidate in ("loop", "whole"):
        return candidate, 0.0
    raise ValueError(f"unknown candidate {candidate!r}")


def read_cache(model, tokenizer, ids: list[int], reading: str = "stream"):
    """The cache a ``bench speed`` session of nugget2d at r = 0.1 holds after reading ``ids`` (streamed,
    or read whole then compressed once)."""
    shape = CacheShape("nugget2d", 0.1, len(ids), reserve=80, reading=reading)
    session = StreamingSession(model, tokenizer, shape.settings())
    session.ingest_ids(ids, final=True)
    return session.cache


def one_step(model, cache, token: torch.Tensor) -> float:
    """Seconds of one single-token forward pass over ``cache`` (left as it is: the pass reads a fork)."""
    with torch.no_grad():
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        returned_cache(model(token, nuggets=cache))
        if model.device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - started


def shape_of(cache) -> dict:
    """Per packed layer the KV heads' lengths, and the slots each way reads over all layers."""
    packed = [layer for layer in cache.layers if layer.packed]
    lengths = [layer.head_lengths() for layer in packed]
    return {
        "layers": len(cache.layers),
        "packed_layers": len(packed),
        "head_lengths": lengths,
        "entries_in_use": int(cache.stored_entries()[0]),
        "longest_over_mean": statistics.mean(max(h) / max(1e-9, statistics.mean(h)) for h in lengths) if lengths else 1,
    }


def measure(model, cache, pairs: list[tuple[str, str]], steps: int, rounds: int, warmup: int, seed: int) -> dict:
    """Median ms of a decode step over ``cache`` for each (backend, candidate): every step of a round runs
    each pair once in a fresh shuffled order, so a change in the machine's load falls on all alike."""
    shipped_reads, shipped_costs = dict(attention_module.HEAD_READS), dict(attention_module.CALL_COST)
    times: dict[tuple[str, str], list[list[float]]] = {pair: [] for pair in pairs}
    order, rng = list(pairs), random.Random(seed)
    token = torch.tensor([[42]], device=model.device)
    try:
        for round_ in range(rounds + 1):  # round 0 warms every pair up (compilation, first-call costs)
            for pair in pairs:
                times[pair].append([])
            for _ in range(warmup if round_ == 0 else steps):
                rng.shuffle(order)
                for backend, candidate in order:
                    how, cost = read_mode(candidate)
                    attention_module.HEAD_READS[backend], attention_module.CALL_COST[backend] = how, cost
                    model.set_attention(backend)
                    times[(backend, candidate)][-1].append(one_step(model, cache, token))
    finally:
        attention_module.HEAD_READS.update(shipped_reads)
        attention_module.CALL_COST.update(shipped_costs)
    results = {}
    for (backend, candidate), rounds_ in times.items():
        every = [t for ran in rounds_[1:] for t in ran]
        results.setdefault(backend, {})[candidate] = {
            "decode_ms_median": 1000 * statistics.median(every),
            "decode_ms_rounds": [1000 * statistics.median(ran) for ran in rounds_[1:]],
        }
    for by_candidate in results.values():
        loop = by_candidate.get("loop", {}).get("decode_ms_median")
        for result in by_candidate.values():
            if loop:
                result["vs_loop"] = result["decode_ms_median"] / loop
    return results


def main() -> None:
    """Parse the options, build each context's cache, time every read, write the JSON after each context."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--contexts", default="2048,8192,16384,32768")
    parser.add_argument("--backends", default="eager,sdpa")
    parser.add_argument("--candidates", default=CANDIDATES)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--model", default=None)
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reading", default="stream", choices=("stream", "whole"), help="as bench quality's")
    args = parser.parse_args()
    model, tokenizer = load_nugget2d(args.model, args.adapter)
    texts, names = load_token_texts(tokenizer, [])
    pairs = [(b, c) for b in args.backends.split(",") for c in args.candidates.split(",")]
    report = {
        "command": "python benchmarks/heads/batched_read.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "machine": machine_info(model, model.adapter_source),
        "input": names,
        "steps": args.steps,
        "rounds": args.rounds,
        "contexts": {},
    }
    for context in map(int, args.contexts.split(",")):
        ids, _ = context_ids(texts, context)
        started = time.perf_counter()
        model.set_attention("sdpa")
        cache = read_cache(model, tokenizer, ids, args.reading)
        read_s = time.perf_counter() - started
        results = measure(model, cache, pairs, args.steps, args.rounds, args.warmup, args.seed)
        report["contexts"][str(context)] = {"read_s": read_s, "cache": shape_of(cache), "results": results}
        report["machine"]["load_average_at_end"] = list(os.getloadavg())
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        summary = {b: {c: round(r["decode_ms_median"], 2) for c, r in by.items()} for b, by in results.items()}
        print(context, json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
