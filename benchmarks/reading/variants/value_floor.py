"""`nugget2d bench ...` with a floor of a pseudo-random sample of each head's candidates, the rest by worth.

A candidate is in its head's floor when a hash of its value vector (values are never re-rotated, so an
entry hashes alike every time it competes) falls below 1 / FLOOR_STRIDE: a stable sample of about one
entry in FLOOR_STRIDE of the text, spread over all of it, in every head of FLOOR_HEADS ("18.0,23.1":
layer.head pairs; default every head). The floor is kept first; the rest of the budget goes by worth,
every (layer, head, entry) competing (``global_share.py`` with GLOBAL=1), or by the slot rule without the scorer reserve
with RULE=slot.
Usage (repository root): FLOOR_STRIDE=s [FLOOR_HEADS=...] [RULE=slot] \
    python benchmarks/reading/variants/value_floor.py bench quality ...
"""

import os
import sys

import torch

from nugget2d.compress import cache as cache_module
from nugget2d.runtime.cli import main

STRIDE = float(os.environ.get("FLOOR_STRIDE", "64"))
HEADS = [tuple(map(int, pair.split("."))) for pair in os.environ.get("FLOOR_HEADS", "").split(",") if pair]
RULE = os.environ.get("RULE", "global")


def _in_floor(values: torch.Tensor) -> torch.Tensor:
    """``(B, H, N)``: whether each entry of ``values`` ``(B, H, N, D)`` is in its head's floor."""
    mix = (values.float() * torch.linspace(1.0, 2.0, values.shape[-1], device=values.device)).sum(dim=-1)
    return torch.frac(mix.abs() * 7919.0) < 1.0 / STRIDE


def keep_top_entries(self, keep, rotary_emb, *, tail=0, lead=None, pool=None, bias_mode="plain", observed=None):
    """The floor first, then the budget left by worth."""
    bounds, pools = self.candidate_worth(tail=tail, lead=lead, pool=pool, observed=observed)
    floors = []
    for index, (layer, (start, stop), worth) in enumerate(zip(self.layers, bounds, pools)):
        floor = _in_floor(layer.values[:, :, start:stop]) & worth.isfinite()
        if HEADS:
            chosen = torch.zeros(worth.shape[1], dtype=torch.bool, device=worth.device)
            chosen[[head for layer_index, head in HEADS if layer_index == index]] = True
            floor &= chosen[None, :, None]
        floors.append(floor)
    taken = sum(floor.flatten(1).sum(dim=1) for floor in floors)
    left = (keep.to(taken.device) - taken).clamp(min=0)
    rest = [worth.masked_fill(floor, float("-inf")) for worth, floor in zip(pools, floors)]
    if RULE == "slot":
        more = cache_module.layer_share_picks(rest, left)
    else:
        more = cache_module.best_anywhere(rest, left)
    moved = rotary_emb if self.position_mode == "cache" else None
    for layer, (start, stop), floor, pick in zip(self.layers, bounds, floors, more):
        cache_module._regroup_layer(layer, start, stop, floor | pick, bias_mode, moved)
        layer.pack()


if __name__ == "__main__":
    cache_module.NuggetCache.keep_top_entries = keep_top_entries
    sys.exit(main(sys.argv[1:]))
