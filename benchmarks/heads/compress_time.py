"""Compression time of each method over a plain prefill of the same context (one thread), read in
the bench's cache shape for that context (r = 0.1).

Usage (repository root): python benchmarks/heads/compress_time.py ADAPTER_DIR OUT.json [CONTEXT=2048]
"""

import json
import sys
import time

import torch

from nugget2d.runtime.bench_quality import QualityOptions
from nugget2d.runtime.cache_policies import OBSERVATION_WINDOW
from nugget2d.runtime.importance import frozen_forward
from nugget2d.runtime.loading import load_nugget2d
from nugget2d.runtime.session import StreamingSession

# (policy, allocation, observation window): the per-head cache with the recent queries voting (the default)
# and with the scorer alone
METHODS = [
    ("nugget2d", "head", OBSERVATION_WINDOW),
    ("nugget2d", "head", 0),
    ("nugget2d", "token", 0),
    ("snapkv", "token", 0),
    ("streaming", "token", 0),
]


def prefill(model, ids: list[int]) -> float:
    """Seconds for one plain pass of the frozen model over ``ids``."""
    started = time.perf_counter()
    with torch.no_grad():
        frozen_forward(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool))
    return time.perf_counter() - started


def main(adapter: str, out: str, context: str = "2048") -> None:
    torch.set_num_threads(1)
    model, tokenizer = load_nugget2d(None, adapter)
    text = open("../shared/data/corpus/complete-angler.txt").read()
    context = int(context)
    ids = tokenizer(text[50000 : 50000 + 20 * context]).input_ids[: context - 1]
    rounds = []
    for _ in range(2):
        row = {"plain_prefill_s": prefill(model, ids)}
        for method, allocation, window in METHODS:
            options = QualityOptions([method], [0.1], [context], observation_window=window)
            settings = options.shape((method, 0.1, context), options.window_reserve).settings()
            settings.allocation = allocation
            session = StreamingSession(model, tokenizer, settings, chat=False)
            started = time.perf_counter()
            session.ingest_ids(ids)
            row[f"{method}-{allocation}{f'-observe{window}' if window else ''}_s"] = time.perf_counter() - started
        row["plain_prefill_s_after"] = prefill(model, ids)
        rounds.append(row)
        print(row, flush=True)
    with open(out, "w") as handle:
        json.dump(rounds, handle, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
