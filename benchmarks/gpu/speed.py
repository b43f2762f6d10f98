"""``nugget2d bench speed`` with the compressing methods reading each context whole, then compressing
it once (``--reading whole`` of ``bench quality``), for the GPU run: streamed reading of a per-head
cache took over 80 s at 8k on the H200 (README). Same measurement otherwise (``run_speed``).

Usage: python benchmarks/gpu/speed.py MODEL ADAPTER BACKEND CONTEXT REPEATS DECODE_TOKENS OUT_DIR [READING=whole]
"""

from __future__ import annotations

import sys

from nugget2d.runtime.bench_speed import SpeedOptions, run_speed
from nugget2d.runtime.loading import load_nugget2d


def main(model: str, adapter: str, backend: str, context: str, repeats: str, decode: str, out: str,
         reading: str = "whole") -> None:  # fmt: skip
    """Measure full KV, ideal and nugget2d at r = 0.1 over one context; write OUT/speed.json and .png."""
    nugget, tokenizer = load_nugget2d(model, adapter, attention=backend)
    options = SpeedOptions(
        methods=["full", "ideal", "nugget2d"],
        ratios=[0.1],
        contexts=[int(context)],
        repeats=int(repeats),
        decode_tokens=int(decode),
        reading=reading,
    )
    print(run_speed(nugget, tokenizer, options, out, adapter=nugget.adapter_source))


if __name__ == "__main__":
    main(*sys.argv[1:])
