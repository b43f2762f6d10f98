"""`nugget2d bench ...` with part of a per-head cache's budget spent across layers.

Sessions give each layer its share of the budget first (``NuggetCache.keep_top_entries``: the
layer's slots, each worth its best head's candidate of that rank, compete for ``budget / heads``
openings) and then fill the share with the layer's best (head, entry) pairs. GLOBAL=a keeps only
(1 - a) of the budget in layer shares and lets the best entries left, in any layer and head, take
the rest (GLOBAL=1: every entry competes with every other; GLOBAL=0: what sessions do). Stored as
sessions store (only the entries in use).
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
    bounds, pools = [], []
    for layer in self.layers:
        length, heads = layer.get_seq_length(), layer.kv_heads
        start = lead if lead is not None else length - tail - pool
        bounds.append((start, length - tail))
        scores = layer.scores if layer.scores.dim() == 3 else layer.scores[:, None, :].expand(-1, heads, -1)
        valid = (layer.bias > cache_module.MASKED / 2).expand(-1, heads, -1)[..., start : length - tail]
        pools.append(scores[..., start : length - tail].masked_fill(~valid, float("-inf")))
    if observed is not None:
        seen = [
            seen[..., start:stop].float().masked_fill(p.isinf(), float("-inf"))
            for seen, (start, stop), p in zip(observed, bounds, pools)
        ]
        pools = cache_module._blend_worth(pools, seen)
    ranked = [p.sort(dim=2, descending=True, stable=True).values for p in pools]
    worth = torch.cat([values.amax(dim=1) for values in ranked], dim=1)  # (B, slots of every layer)
    heads = pools[0].shape[1]
    opened = torch.minimum(keep.to(worth.device) // heads, worth.isfinite().sum(dim=1))
    best = worth.argsort(dim=1, descending=True, stable=True)
    is_open = torch.zeros_like(worth, dtype=torch.bool).scatter_(
        1, best, torch.arange(best.shape[1], device=worth.device) < opened[:, None]
    )
    picks = []
    for p, part in zip(pools, is_open.split([p.shape[2] for p in pools], 1)):
        flat = p.flatten(1)
        share = torch.minimum((part.sum(dim=1) * heads * (1 - GLOBAL)).long(), flat.isfinite().sum(dim=1))
        picks.append(_top(flat, share))
    if GLOBAL:  # the rest of the budget goes to the best entries left, wherever they are
        rest = torch.cat([p.flatten(1).masked_fill(pick, float("-inf")) for p, pick in zip(pools, picks)], dim=1)
        left = keep.to(rest.device) - sum(pick.sum(dim=1) for pick in picks)
        extra = _top(rest, torch.minimum(left.clamp(min=0), rest.isfinite().sum(dim=1))).split(
            [pick.shape[1] for pick in picks], 1
        )
        picks = [pick | more for pick, more in zip(picks, extra)]
    moved = rotary_emb if self.position_mode == "cache" else None
    for layer, (start, stop), p, pick in zip(self.layers, bounds, pools, picks):
        cache_module._regroup_layer(layer, start, stop, pick.view_as(p), bias_mode, moved)
        layer.pack()


def _top(flat: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mask of each row's ``count`` best values of ``flat`` ``(B, N)``."""
    order = flat.argsort(dim=1, descending=True, stable=True)
    ranks = torch.arange(flat.shape[1], device=flat.device) < count[:, None]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, ranks)


if __name__ == "__main__":
    cache_module.NuggetCache.keep_top_entries = keep_top_entries
    sys.exit(main(sys.argv[1:]))
