"""Selection fixes for the per-head cache, tried as patches of the pre-refactor code and measured on
RULER niah_single_1 at 2k (12 samples, 10 %) and on 2k continuation / far-recall perplexity (the
bench's 4 windows of two corpus books, 10 %).

Variants (``--variants``, comma-separated; see ``VARIANTS``):

* ``default`` — the shipped rule (scorer reserve of 120 tokens' worth, then worth = max of the scorer's
  and the observation window's percentiles, split per layer by the slot rule).
* ``surprise<M>`` — before the scorer's reserve, the ``M`` tokens' worth (× layers × KV heads) of
  candidate entries whose token was most surprising (negative log-likelihood of the token under the
  encoder pass's own logits, computed while reading) are kept, in every head they are still in.
* ``sworth`` — the surprise's percentile votes in the worth beside the scorer's and the attention's.
* ``cap<F>`` — the scorer's reserve takes at most the fraction ``F`` of what is kept (the rest by worth),
  so the attention votes from the first segment on.

    OMP_NUM_THREADS=1 PYTHONPATH=/work/before_pkg /work/main/.venv/bin/python benchmarks/needles/fixes.py \
        --variants default,surprise16 --out fixes.json

Needs the corpus books (``--input``); writes JSON with niah score, answers, ppl, recall_ppl and the
reading time with and without the surprise computation.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import common  # noqa: E402

from nugget2d.compress import cache as cache_mod  # noqa: E402
from nugget2d.compress import model as model_mod  # noqa: E402
from nugget2d.runtime.bench_common import CacheShape, load_token_texts  # noqa: E402
from nugget2d.runtime.bench_quality import QualityOptions, perplexities, windows  # noqa: E402

BOOKS = [
    "/work/shared/data/corpus/little-colonels-hero.txt",
    "/work/shared/data/corpus/complete-angler.txt",
]


@dataclass
class Variant:
    """One selection rule (see the module docstring)."""

    name: str
    surprise_tokens: int = 0
    surprise_worth: bool = False
    reserve_cap: float | None = None

    @property
    def needs_surprise(self) -> bool:
        return self.surprise_tokens > 0 or self.surprise_worth


def parse_variant(name: str) -> Variant:
    """``default``, ``surprise16``, ``sworth``, ``cap0.5`` and ``+``-joined combinations."""
    v = Variant(name)
    for part in name.split("+"):
        if part == "default":
            continue
        if m := re.fullmatch(r"surprise(\d+)", part):
            v.surprise_tokens = int(m.group(1))
        elif part == "sworth":
            v.surprise_worth = True
        elif m := re.fullmatch(r"cap([0-9.]+)", part):
            v.reserve_cap = float(m.group(1))
        else:
            raise ValueError(f"unknown variant part {part!r}")
    return v


VARIANT = Variant("default")
#: surprise (nats) of the token at each text position of the session being read; -inf: unknown
SURPRISE = torch.full((1 << 16,), float("-inf"))
TIMING = {"surprise_s": 0.0}
_LAST = {"logp": None}

ORIGINAL_RUN = model_mod.Nugget2DModel._run
ORIGINAL_KEEP = cache_mod.NuggetCache.keep_top_entries


def run_with_surprise(self, cache, input_ids, mask, adapter, module, **extra):
    """The model's pass; when it encodes (reads) text, also each token's surprise from its own logits."""
    before = int(cache.seen_tokens[0]) if cache.seen_tokens is not None else 0
    out = ORIGINAL_RUN(self, cache, input_ids, mask, adapter, module, **extra)
    if VARIANT.needs_surprise and module is not self.base:
        started = time.perf_counter()
        if before == 0:
            SURPRISE.fill_(float("-inf"))
            _LAST["logp"] = None
        logp = self.base.lm_head(out.last_hidden_state[0]).float().log_softmax(-1)
        ids = input_ids[0]
        prev = torch.cat([_LAST["logp"], logp[:-1]]) if _LAST["logp"] is not None else logp[:-1]
        targets = ids if _LAST["logp"] is not None else ids[1:]
        nll = -prev.gather(1, targets[:, None])[:, 0]
        first = before if _LAST["logp"] is not None else before + 1
        SURPRISE[first : first + nll.shape[0]] = nll
        _LAST["logp"] = logp[-1:]
        TIMING["surprise_s"] += time.perf_counter() - started
    return out


def keep_with_variant(self, keep, rotary_emb, *, tail=0, lead=None, pool=None, bias_mode="plain", observed=None):
    """``NuggetCache.keep_top_entries`` under ``VARIANT`` (the default variant calls the original)."""
    v = VARIANT
    if observed is None or (not v.needs_surprise and v.reserve_cap is None):
        return ORIGINAL_KEEP(
            self, keep, rotary_emb, tail=tail, lead=lead, pool=pool, bias_mode=bias_mode, observed=observed
        )
    bounds, scores = self._candidate_scores(tail, lead, pool)
    heads = self.layers[0].kv_heads
    per_token = len(self.layers) * heads
    k = keep.to(scores[0].device)
    taken = [torch.zeros_like(s, dtype=torch.bool) for s in scores]
    surprise = None
    if v.needs_surprise:
        surprise = []
        for layer, (a, b), s in zip(self.layers, bounds, scores):
            pos = layer.positions if layer.positions.dim() == 3 else layer.positions[:, None, :].expand(-1, heads, -1)
            surprise.append(
                SURPRISE[pos[..., a:b].clamp(max=SURPRISE.numel() - 1)].masked_fill(s.isinf(), float("-inf"))
            )
    if v.surprise_tokens:
        taken = cache_mod.best_anywhere(surprise, k.clamp(max=v.surprise_tokens * per_token))
    left = k - sum(t.flatten(1).sum(dim=1) for t in taken)
    reserve = (cache_mod.SCORER_RESERVE or 0) * per_token
    if v.reserve_cap is not None:
        reserve = torch.minimum(torch.full_like(left, reserve), (left.float() * v.reserve_cap).long())
    else:
        reserve = torch.full_like(left, reserve)
    free = [s.masked_fill(t, float("-inf")) for s, t in zip(scores, taken)]
    reserved = cache_mod.best_anywhere(free, torch.minimum(left, reserve))
    left = left - sum(r.flatten(1).sum(dim=1) for r in reserved)
    seen = [o[..., a:b].float().masked_fill(s.isinf(), float("-inf")) for o, (a, b), s in zip(observed, bounds, scores)]
    worth = [torch.maximum(x, y) for x, y in zip(cache_mod._percentiles(scores), cache_mod._percentiles(seen))]
    if v.surprise_worth:
        worth = [torch.maximum(w, z) for w, z in zip(worth, cache_mod._percentiles(surprise))]
    worth = [w.masked_fill(t | r, float("-inf")) for w, t, r in zip(worth, taken, reserved)]
    rest = cache_mod.layer_share_picks(worth, left)
    picks = [t | r | x for t, r, x in zip(taken, reserved, rest)]
    moved = rotary_emb if self.position_mode == "cache" else None
    for layer, (start, stop), chosen in zip(self.layers, bounds, picks):
        cache_mod._regroup_layer(layer, start, stop, chosen, bias_mode, moved)
        layer.pack()


def niah(model, tok, samples_) -> dict:
    """The niah_single_1 score, answers and reading time of the current variant."""
    answers, read = [], 0.0
    TIMING["surprise_s"] = 0.0
    for sample in samples_:
        reply, _, read_s = common.answer(model, tok, sample)
        read += read_s
        answers.append(
            {"index": sample.index, "expected": sample.answers[0], "answer": reply, "score": sample.score(reply)}
        )
    return {
        "niah_score": sum(a["score"] for a in answers) / len(answers),
        "niah_correct": sum(int(a["score"]) for a in answers),
        "read_s": read,
        "surprise_s": TIMING["surprise_s"],
        "answers": answers,
    }


def ppl(model, tok, count: int, books: list[str]) -> dict:
    """Continuation and far-recall perplexity over the bench's windows (as ``bench quality``)."""
    options = QualityOptions(
        methods=["nugget2d"], ratios=[0.1], contexts=[2048], metrics=["ppl", "recall_ppl"], samples=count, inputs=books
    )
    texts, _ = load_token_texts(tok, books)
    shape = CacheShape("nugget2d", 0.1, 2048, options.window_reserve)
    sums = {"ppl": [0.0, 0], "recall_ppl": [0.0, 0]}
    for ids in windows(texts, 2048 + options.continuation, count):
        result = perplexities(model, tok, shape, ids, options)
        for metric in sums:
            sums[metric][0] += result[metric][0]
            sums[metric][1] += result[metric][1]
    return {metric: math.exp(s / n) for metric, (s, n) in sums.items()}


def main() -> None:
    global VARIANT
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="default")
    parser.add_argument("--out", default="fixes.json")
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--skip-ppl", action="store_true")
    parser.add_argument("--input", nargs="+", default=BOOKS, help="the books of the ppl windows")
    args = parser.parse_args()
    model_mod.Nugget2DModel._run = run_with_surprise
    cache_mod.NuggetCache.keep_top_entries = keep_with_variant
    model, tok = common.load()
    samples_ = common.samples(tok, args.samples)
    path = common.HERE / args.out
    results = json.loads(path.read_text())["variants"] if path.exists() else {}
    for name in args.variants.split(","):
        VARIANT = parse_variant(name)
        rec = niah(model, tok, samples_)
        if not args.skip_ppl:
            rec.update(ppl(model, tok, args.windows, args.input))
        results[name] = rec
        print(
            f"{name}: niah {rec['niah_correct']}/{len(samples_)} ppl {rec.get('ppl', float('nan')):.2f} "
            f"recall {rec.get('recall_ppl', float('nan')):.2f} read {rec['read_s']:.1f}s "
            f"surprise {rec['surprise_s']:.1f}s",
            flush=True,
        )
        common.write_json(
            args.out,
            {
                "command": " ".join(
                    ["PYTHONPATH=/work/before_pkg python", "benchmarks/needles/fixes.py", *sys.argv[1:]]
                ),
                "machine": "this project's shared 2-core CPU, OMP_NUM_THREADS=1",
                "variants": results,
            },
        )


if __name__ == "__main__":
    main()
