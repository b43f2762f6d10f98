"""Where the default cache drops each needle: every per-head selection (``keep_top_entries``) of a
niah_single_1 2k read is replayed step by step — reserve (the scorer's best over all layers and
heads), worth (max of the scorer's and the observation window's percentiles) over all layers, then
the per-layer slot rule — and the fate of the needle's entries is recorded per layer and KV head.

    OMP_NUM_THREADS=1 PYTHONPATH=/work/before_pkg /work/main/.venv/bin/python benchmarks/needles/trace.py

Writes ``trace.json``. Analysis only: the cache code is wrapped, not changed.
"""

from __future__ import annotations

import sys
from collections import Counter

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402

from nugget2d.compress import cache as cache_mod  # noqa: E402
from nugget2d.compress.attention import MASKED  # noqa: E402

EVENTS: list[dict] = []
WATCH: set[int] = set()


def _positions(layer, start: int, stop: int, heads: int) -> torch.Tensor:
    pos = layer.positions if layer.positions.dim() == 3 else layer.positions[:, None, :].expand(-1, heads, -1)
    return pos[0, :, start:stop]


def traced(self, keep, rotary_emb, *, tail=0, lead=None, pool=None, bias_mode="plain", observed=None):
    """Replay the selection's parts, record the needle's candidates, then run the real one."""
    bounds, scores = self._candidate_scores(tail, lead, pool)
    heads = self.layers[0].kv_heads
    reserve = (cache_mod.SCORER_RESERVE or 0) * len(self.layers) * heads
    score_pct = cache_mod._percentiles(scores)
    seen = [o[..., a:b].float().masked_fill(s.isinf(), float("-inf")) for o, (a, b), s in zip(observed, bounds, scores)]
    seen_pct = cache_mod._percentiles(seen)
    worth = [torch.maximum(x, y) for x, y in zip(score_pct, seen_pct)]
    k = keep.to(scores[0].device)
    reserved = cache_mod.best_anywhere(scores, k.clamp(max=reserve))
    left = k - sum(r.flatten(1).sum(dim=1) for r in reserved)
    masked = [w.masked_fill(r, float("-inf")) for w, r in zip(worth, reserved)]
    rest = cache_mod.layer_share_picks(masked, left)
    global_rest = cache_mod.best_anywhere(masked, left)
    call = EVENTS[-1]["call"] + 1 if EVENTS else 0
    n_cand = int(sum(s.isfinite().sum() for s in scores))
    for li, (layer, (a, b)) in enumerate(zip(self.layers, bounds)):
        pos = _positions(layer, a, b, heads)
        for h in range(heads):
            for j in range(b - a):
                p = int(pos[h, j])
                if p in WATCH and bool(scores[li][0, h, j].isfinite()):
                    EVENTS.append(
                        {
                            "call": call,
                            "layer": li,
                            "head": h,
                            "pos": p,
                            "score_pct": float(score_pct[li][0, h, j]),
                            "seen_pct": float(seen_pct[li][0, h, j]),
                            "reserved": bool(reserved[li][0, h, j]),
                            "worth_global": bool(global_rest[li][0, h, j]),
                            "kept": bool(reserved[li][0, h, j] | rest[li][0, h, j]),
                            "candidates": n_cand,
                            "keep": int(k[0]),
                            "reserve": int(min(reserve, int(k[0]))),
                        }
                    )
    return ORIGINAL(self, keep, rotary_emb, tail=tail, lead=lead, pool=pool, bias_mode=bias_mode, observed=observed)


def final_presence(cache, positions: list[int]) -> dict[int, list[list[bool]]]:
    """Per watched position: per layer, per KV head, whether the final cache holds its entry."""
    out = {p: [] for p in positions}
    for layer in cache.layers:
        heads = layer.kv_heads
        pos = layer.positions if layer.positions.dim() == 3 else layer.positions[:, None, :].expand(-1, heads, -1)
        valid = (layer.bias > MASKED / 2).expand(-1, heads, -1)
        for p in positions:
            out[p].append([bool(((pos[0, h] == p) & valid[0, h]).any()) for h in range(heads)])
    return out


def fate(events: list[dict], pos: int, layer: int, head: int) -> str:
    """Which step dropped entry (pos, layer, head): the last selection it lost, and why."""
    mine = [e for e in events if e["pos"] == pos and e["layer"] == layer and e["head"] == head]
    if not mine:
        return "never a candidate"
    lost = [e for e in mine if not e["kept"]]
    if not lost:
        return "kept"
    e = lost[0]
    when = "on leaving the raw window" if e is mine[0] else "later eviction"
    why = "per-layer split" if e["worth_global"] else "worth"
    return f"{why}, {when}"


def _first_budget(events: list[dict]) -> dict | None:
    """Entries kept and reserved for the scorer at the first selection that saw the needle."""
    if not events:
        return None
    return {"keep": events[0]["keep"], "reserve": events[0]["reserve"], "candidates": events[0]["candidates"]}


ORIGINAL = cache_mod.NuggetCache.keep_top_entries


def main() -> None:
    cache_mod.NuggetCache.keep_top_entries = traced
    model, tok = common.load()
    out, events = [], []
    for sample in common.samples(tok):
        nd = common.needle(tok, sample)
        WATCH.clear()
        WATCH.update(nd.sentence)
        EVENTS.clear()
        reply, session, read_s = common.answer(model, tok, sample)
        score = sample.score(reply)
        present = final_presence(session.cache, nd.sentence)
        layers, heads = len(session.cache.layers), session.cache.layers[0].kv_heads
        fates = {p: Counter(fate(EVENTS, p, li, h) for li in range(layers) for h in range(heads)) for p in nd.sentence}
        first = {}
        for p in nd.sentence:
            calls = sorted({e["call"] for e in EVENTS if e["pos"] == p})
            if calls:
                ev = [e for e in EVENTS if e["pos"] == p and e["call"] == calls[0]]
                first[p] = {
                    "call": calls[0],
                    "score_pct_median": float(torch.tensor([e["score_pct"] for e in ev]).median()),
                    "score_pct_max": max(e["score_pct"] for e in ev),
                    "seen_pct_median": float(torch.tensor([e["seen_pct"] for e in ev]).median()),
                    "seen_pct_max": max(e["seen_pct"] for e in ev),
                    "kept_first": sum(e["kept"] for e in ev),
                    "reserved_first": sum(e["reserved"] for e in ev),
                }
        rec = {
            "index": sample.index,
            "expected": sample.answers[0],
            "answer": reply,
            "score": score,
            "read_s": read_s,
            "context_tokens": len(sample.split_ids(tok)[0]),
            "sentence": nd.sentence,
            "key": nd.key,
            "value": nd.value,
            "tokens": tok.convert_ids_to_tokens([sample.split_ids(tok)[0][p] for p in nd.sentence]),
            "final_kept_pairs": {str(p): sum(map(sum, present[p])) for p in nd.sentence},
            "final_by_layer": {str(p): [sum(row) for row in present[p]] for p in nd.sentence},
            "fates": {str(p): dict(c) for p, c in fates.items()},
            "first_selection": {str(p): v for p, v in first.items()},
            "selections": EVENTS[-1]["call"] + 1 if EVENTS else 0,
            "first_keep_vs_reserve": _first_budget(EVENTS),
        }
        events.append({"index": sample.index, "events": list(EVENTS)})
        out.append(rec)
        value_pairs = sum(rec["final_kept_pairs"][str(p)] for p in nd.value)
        key_pairs = sum(rec["final_kept_pairs"][str(p)] for p in nd.key)
        print(
            f"sample {sample.index}: {score:.0f} {reply[:30]!r} value pairs kept {value_pairs}/{len(nd.value) * 90} "
            f"key pairs {key_pairs}/{len(nd.key) * 90} read {read_s:.1f}s",
            flush=True,
        )
    command = "PYTHONPATH=/work/before_pkg python benchmarks/needles/trace.py"
    common.write_json("trace.json", {"command": command, "samples": out})
    common.write_json("trace_events.json", {"command": command, "samples": events})  # large, not committed


if __name__ == "__main__":
    main()
