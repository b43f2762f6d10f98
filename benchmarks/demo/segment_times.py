"""Time every segment read while streaming the bundled book into the demo's cache (default model).

Writes one JSON record: per-segment seconds in order, medians of the first and last segments,
tokens/s overall. Regenerate:

    .venv/bin/python benchmarks/demo/segment_times.py --tokens 0 --out benchmarks/demo/segment_times.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from nugget2d.runtime.demo import demo_cache_config
from nugget2d.runtime.loading import load_nugget2d
from nugget2d.runtime.session import StreamingSession
from nugget2d.runtime.texts import bundled_text


def timed_session(session: StreamingSession) -> list[tuple[float, float, int]]:
    """Record ``(wall s, process CPU s, entries held after)`` of each segment ``session`` encodes
    (wraps the instance's method)."""
    times: list[tuple[float, float, int]] = []
    encode = session._encode_segment

    def timed(ids: list[int]) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        encode(ids)
        held = session.sinks + session.nuggets + session.raw
        times.append((time.perf_counter() - wall, time.process_time() - cpu, held))

    session._encode_segment = timed
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=0, help="tokens of the book to read (0: all)")
    parser.add_argument("--edge", type=int, default=20, help="segments at each end whose median is compared")
    parser.add_argument("--budget", type=int, default=2048, help="cache entries (the demo's default: 2048)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    model, tokenizer = load_nugget2d()
    ids = tokenizer(bundled_text(), add_special_tokens=False, verbose=False).input_ids
    ids = ids[: args.tokens] if args.tokens else ids
    session = StreamingSession(model, tokenizer, demo_cache_config(args.budget), progress=False)
    times = timed_session(session)
    started = time.perf_counter()
    session.ingest_ids(ids)
    total = time.perf_counter() - started
    load = os.getloadavg()[0]
    whole = times[:-1] if len(ids) % session.settings.segment else times  # a short last segment is left out
    walls, cpus = [t[0] for t in whole], [t[1] for t in whole]
    full_at = next((i for i, t in enumerate(whole) if t[2] >= args.budget), None)
    first, last = statistics.median(cpus[: args.edge]), statistics.median(cpus[-args.edge :])
    settled = statistics.median(cpus[full_at : full_at + args.edge]) if full_at is not None else None
    record = {
        "command": f"python benchmarks/demo/segment_times.py --tokens {args.tokens} --budget {args.budget}",
        "machine": "this project's shared 2-core CPU",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_end": round(load, 1),
        "budget": args.budget,
        "tokens": len(ids),
        "segments": len(times),
        "seconds": round(total, 1),
        "tokens_per_s": round(len(ids) / total, 1),
        "median_cpu_first_s": round(first, 3),
        "median_cpu_last_s": round(last, 3),
        "cpu_growth": round(last / first - 1, 3),
        "cache_full_at_segment": full_at,
        "median_cpu_once_full_s": round(settled, 3) if settled else None,
        "cpu_growth_once_full": round(last / settled - 1, 3) if settled else None,
        "median_wall_first_s": round(statistics.median(walls[: args.edge]), 3),
        "median_wall_last_s": round(statistics.median(walls[-args.edge :]), 3),
        "segments_wall_cpu_entries": [[round(w, 3), round(c, 3), n] for w, c, n in times],
    }
    text = json.dumps(record, indent=1)
    print(json.dumps({k: v for k, v in record.items() if k != "segments_wall_cpu_entries"}, indent=1))
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
