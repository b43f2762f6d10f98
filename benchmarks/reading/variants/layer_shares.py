"""`nugget2d bench ...` with a per-head cache's layer shares set by the scores of every (layer, head,
entry) together, then filled within each layer by the entries' worth.

Sessions until 2026-11-30 afternoon (before the scorer reserve) gave each layer its share by the slot
rule (``NuggetCache.keep_top_entries``) and filled it with the layer's best (head, entry) pairs by worth
(the better of the score's and the recent attention's percentile). ``global_share.py`` lets every
(layer, head, entry) compete by that worth. SHARES=score: the ``keep`` best entries by the scorer's
score alone, over every layer and head, say how many entries each layer keeps; the layer's best pairs by
worth fill them. SHARES=layer-percentile: every entry competes across layers by worth, with both
percentiles taken within its own layer; SHARES=attention-layer-percentile: the same with the score's
percentile taken over all layers and the attention's within the entry's layer. Heads take as many of
their layer's entries as they win (no cap). Stored as sessions store.
Usage (repository root):
  SHARES=score|layer-percentile python benchmarks/reading/variants/layer_shares.py bench quality ...
"""

import os
import sys

import torch

from nugget2d.compress import cache as cache_module
from nugget2d.runtime.cli import main

SHARES = os.environ.get("SHARES", "score")
if SHARES not in ("score", "layer-percentile", "attention-layer-percentile"):
    raise SystemExit(f"SHARES must be 'score', 'layer-percentile' or 'attention-layer-percentile', got {SHARES!r}")


def _shares(pools: list[torch.Tensor], keep: torch.Tensor) -> list[torch.Tensor]:
    """How many of the ``keep`` best values of all ``pools`` fall in each pool, ``(B,)`` per pool."""
    return [best.flatten(1).sum(dim=1) for best in cache_module.best_anywhere(pools, keep)]


def keep_top_entries(self, keep, rotary_emb, *, tail=0, lead=None, pool=None, bias_mode="plain", observed=None):
    """Layer shares by SHARES, (head, entry) pairs by worth within each layer."""
    bounds, pools = self.candidate_worth(tail=tail, lead=lead, pool=pool)
    if SHARES == "score":
        shares = _shares(pools, keep)
        if observed is not None:
            bounds, pools = self.candidate_worth(tail=tail, lead=lead, pool=pool, observed=observed)
    else:
        within = SHARES == "layer-percentile"
        scores = [cache_module._percentiles([p])[0] for p in pools] if within else cache_module._percentiles(pools)
        if observed is not None:
            seen = [
                o[..., start:stop].float().masked_fill(p.isinf(), float("-inf"))
                for o, (start, stop), p in zip(observed, bounds, pools)
            ]
            pools = [torch.maximum(p, cache_module._percentiles([s])[0]) for p, s in zip(scores, seen)]
        else:
            pools = scores
        shares = _shares(pools, keep)
    moved = rotary_emb if self.position_mode == "cache" else None
    for layer, (start, stop), p, share in zip(self.layers, bounds, pools, shares):
        pick = cache_module._best(p.flatten(1), torch.minimum(share, p.flatten(1).isfinite().sum(dim=1)))
        cache_module._regroup_layer(layer, start, stop, pick.view_as(p), bias_mode, moved)
        layer.pack()


if __name__ == "__main__":
    cache_module.NuggetCache.keep_top_entries = keep_top_entries
    sys.exit(main(sys.argv[1:]))
