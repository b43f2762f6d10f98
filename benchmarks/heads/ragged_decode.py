"""Decode time over a per-head cache whose heads keep uneven shares, read three ways, interleaved in one
process (one thread): each head at its own length (the nugget2d backends' per-head reading of a packed
layer), the packed layer rebuilt whole with masked zeros (how it was read before), and the same cache
stored unpacked (masked slots held as zeros: more memory, nothing rebuilt). The reference is the
cache of the cap shipped before (a head fills its layer's opened slots and no more), read as it is now.

Each cache is what the bench's session holds after reading CONTEXT tokens of the bundled book (r = 0.1,
shipped adapter); a decode step is one forward pass of one token over it (the cache grows by one).
Usage (repository root): python benchmarks/heads/ragged_decode.py OUT.json [CONTEXT=8192] [STEPS=32] [ROUNDS=3]
"""

import json
import statistics
import sys
import time

import torch

from nugget2d.compress import attention as attention_module
from nugget2d.compress import cache as cache_module
from nugget2d.compress.hf_compat import returned_cache
from nugget2d.runtime.bench_common import CacheShape, load_token_texts, machine_info
from nugget2d.runtime.bench_speed import context_ids
from nugget2d.runtime.loading import load_nugget2d
from nugget2d.runtime.session import StreamingSession


def read_cache(model, tokenizer, ids: list[int], head_slots: float):
    """The cache a bench session holds after reading ``ids`` with ``HEAD_SLOTS = head_slots``."""
    cache_module.HEAD_SLOTS = head_slots
    shape = CacheShape("nugget2d", 0.1, len(ids), reserve=64)
    session = StreamingSession(model, tokenizer, shape.settings(), chat=False)
    session.ingest_ids(ids, final=True)
    return session.cache


#: How each backend reads packed layers, as shipped.
HEAD_READS = attention_module.HEAD_READS


def decode_ms(model, cache, steps: int, per_head: bool) -> float:
    """Median ms of ``steps`` single-token passes over a fork of ``cache``."""
    attention_module.HEAD_READS = HEAD_READS if per_head else dict.fromkeys(HEAD_READS, "whole")
    token = torch.tensor([[42]])
    times = []
    with torch.no_grad():
        for _ in range(steps):
            started = time.perf_counter()
            cache = returned_cache(model(token, nuggets=cache))
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main(out: str, context: str = "8192", steps: str = "32", rounds: str = "3") -> None:
    torch.set_num_threads(1)
    model, tokenizer = load_nugget2d(None, None)
    texts, _ = load_token_texts(tokenizer, [])
    ids, _ = context_ids(texts, int(context))
    shipped = read_cache(model, tokenizer, ids, 1.0)
    uneven = read_cache(model, tokenizer, ids, float(model.num_kv_heads))  # a head may take its layer's share
    cache_module.HEAD_SLOTS = 1.0
    dense = uneven.fork()
    for layer in dense.layers:
        layer.keys, layer.values = layer.keys, layer.values  # assigning unpacks: masked slots stored as zeros
    caches = {
        "shipped cap, per-head reading": (shipped, True),
        "uneven heads, per-head reading": (uneven, True),
        "uneven heads, rebuilt whole": (uneven, False),
        "uneven heads, stored unpacked": (dense, True),
    }
    results = {name: [] for name in caches}
    for _ in range(int(rounds)):
        for name, (cache, per_head) in caches.items():
            results[name].append(decode_ms(model, cache, int(steps), per_head))
        print({name: round(ms[-1], 1) for name, ms in results.items()}, flush=True)
    report = {
        "context": int(context),
        "steps": int(steps),
        "machine": machine_info(model, model.adapter_source),
        "runs": {
            name: {
                "decode_ms_median": statistics.median(ms),
                "decode_ms_rounds": ms,
                "packed_layers": sum(layer.packed for layer in cache.layers),
                "slots_read_per_head": sum(layer.get_seq_length() for layer in cache.layers),
                "entries_in_use": int(cache.stored_entries()[0]),
                "kv_bytes": cache.kv_nbytes(),
            }
            for (name, (cache, _)), ms in zip(caches.items(), results.values())
        },
    }
    with open(out, "w") as handle:
        json.dump(report, handle, indent=1)
    print(json.dumps({k: v["decode_ms_median"] for k, v in report["runs"].items()}))


if __name__ == "__main__":
    main(*sys.argv[1:])
