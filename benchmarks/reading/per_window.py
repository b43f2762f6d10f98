"""Continuation and far-recall perplexity of each window `nugget2d bench quality` reads (one thread,
r = 0.1, the bench's default settings), to see whether a difference between two adapters is
spread over the windows or comes from a few.

Usage (repository root): python benchmarks/reading/per_window.py ADAPTER_DIR CONTEXT SAMPLES OUT.json
"""

import json
import math
import sys

import torch

from nugget2d.runtime.bench_common import load_token_texts
from nugget2d.runtime.bench_quality import QualityOptions, perplexities, windows
from nugget2d.runtime.loading import load_nugget2d

BOOKS = ["../shared/data/corpus/little-colonels-hero.txt", "../shared/data/corpus/complete-angler.txt"]


def main(adapter: str, context_arg: str, samples: str, out: str) -> None:
    torch.set_num_threads(1)
    context = int(context_arg)
    options = QualityOptions(
        methods=["nugget2d"],
        ratios=[0.1],
        contexts=[context],
        inputs=BOOKS,
        metrics=["ppl", "recall_ppl"],
        samples=int(samples),
    )
    model, tokenizer = load_nugget2d(None, adapter)
    texts, _ = load_token_texts(tokenizer, options.inputs)
    shape = options.shape(("nugget2d", 0.1, context), options.window_reserve)
    rows = []
    for ids in windows(texts, context + options.continuation, options.samples):
        result = perplexities(model, tokenizer, shape, ids, options)
        rows.append({metric: math.exp(result[metric][0] / result[metric][1]) for metric in ("ppl", "recall_ppl")})
        print(rows[-1], flush=True)
    with open(out, "w") as handle:
        json.dump({"adapter": adapter, "context": context, "windows": rows}, handle, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
