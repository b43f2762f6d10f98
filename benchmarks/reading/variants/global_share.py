"""`nugget2d bench ...` with part of a per-head cache's budget spent across layers.

Sessions give each layer its share of the budget first (``NuggetCache.keep_top_entries``: the
layer's slots, each worth its best head's candidate of that rank, compete for ``budget / heads``
openings) and then fill the share with the layer's best (head, entry) pairs. GLOBAL=a keeps only
(1 - a) of the budget in layer shares and lets the best entries left, in any layer and head, take
the rest (GLOBAL=1: every entry competes with every other). A head may fill its whole layer's share
(no cap: ``HEAD_SLOTS`` = heads; sessions now cap it at 1, so GLOBAL=0 here is `head_slots.py` with
HEAD_SLOTS=3). Stored as sessions store (only the entries in use).
Usage (repository root): GLOBAL=a python benchmarks/reading/variants/global_share.py bench quality ...
"""

import os
import sys

import torch

from nugget2d.compress import cache as cache_module
from nugget2d.runtime.cli import main

#: GLOBAL=a: the layers' shares cover (1 - a) of the budget; the best entries left take the rest.
GLOBAL = float(os.environ.get("GLOBAL", "0"))


def keep_top_entries(self, keep, rotary_emb, *, tail=0, lead=None, pool=None, bias_mode="plain", observed=None):
    """Layer shares by the slot rule, (head, entry) pairs by worth within each layer."""
    bounds, pools = self.candidate_worth(tail=tail, lead=lead, pool=pool, observed=observed)
    ranked = [p.sort(dim=2, descending=True, stable=True).values for p in pools]
    worth = torch.cat([values.amax(dim=1) for values in ranked], dim=1)  # (B, slots of every layer)
    heads = pools[0].shape[1]
    is_open = cache_module._best(worth, torch.minimum(keep.to(worth.device) // heads, worth.isfinite().sum(dim=1)))
    picks = []
    for p, part in zip(pools, is_open.split([p.shape[2] for p in pools], 1)):
        flat = p.flatten(1)
        share = torch.minimum((part.sum(dim=1) * heads * (1 - GLOBAL)).long(), flat.isfinite().sum(dim=1))
        picks.append(cache_module._best(flat, share))
    if GLOBAL:  # the rest of the budget goes to the best entries left, wherever they are
        rest = torch.cat([p.flatten(1).masked_fill(pick, float("-inf")) for p, pick in zip(pools, picks)], dim=1)
        left = keep.to(rest.device) - sum(pick.sum(dim=1) for pick in picks)
        extra = cache_module._best(rest, torch.minimum(left.clamp(min=0), rest.isfinite().sum(dim=1))).split(
            [pick.shape[1] for pick in picks], 1
        )
        picks = [pick | more for pick, more in zip(picks, extra)]
    moved = rotary_emb if self.position_mode == "cache" else None
    for layer, (start, stop), p, pick in zip(self.layers, bounds, pools, picks):
        cache_module._regroup_layer(layer, start, stop, pick.view_as(p), bias_mode, moved)
        layer.pack()


if __name__ == "__main__":
    cache_module.NuggetCache.keep_top_entries = keep_top_entries
    sys.exit(main(sys.argv[1:]))
