"""`nugget2d bench ...` with the per-head budget rule changed one way or another (2026-11-30 probes).

Environment (unset: the rule shipped before the scorer reserve, i.e. the slot rule alone):

* ``RESERVE=n`` — n entries (all of the budget when fewer) to the scorer's best scores over all
  layers and heads, the slot rule for the rest (``reserve_then_share``; shipped since with n = 120 ×
  layers × heads). ``SPLIT=a`` — the same with a share ``a`` of the budget instead of n entries.
* ``GLOBAL=a`` — the slot rule for (1 - a) of the budget, the best entries left anywhere for the
  rest (as ``global_share.py``); ``PROTECT=18.0,23.1`` — those (layer, head) pairs keep what the slot
  rule gives them, and every other entry competes across layers for the rest.
* ``MASS=m`` — each head's kept entries get ``m · log(A / a)`` more bias (at most ``log(candidates /
  kept)``), where the recent queries gave its candidates attention ``A`` and its kept entries ``a``:
  the head's kept entries take back the mass of the ones it evicts; the boosts accumulate.
* ``ATTENTION_WEIGHT=w`` — worth is the better of the score's percentile and ``w`` times the
  attention's (1: shipped).

Without voting queries (``--observation-window 0``) only GLOBAL and PROTECT apply.
Usage (repository root): RESERVE=10800 python benchmarks/reading/variants/rule_probes.py bench quality ...
"""

import os
import sys

import torch

from nugget2d.compress import cache as cache_module
from nugget2d.runtime.cli import main

RESERVE = int(os.environ.get("RESERVE", "0"))
SPLIT = float(os.environ.get("SPLIT", "0"))
GLOBAL = float(os.environ.get("GLOBAL", "0"))
PROTECT = [tuple(map(int, pair.split("."))) for pair in os.environ.get("PROTECT", "").split(",") if pair]
MASS = float(os.environ.get("MASS", "0"))
ATTENTION_WEIGHT = float(os.environ.get("ATTENTION_WEIGHT", "1"))


def _global_picks(pools, keep):
    """GLOBAL / PROTECT: the slot rule's part (or the protected heads' picks), then the best left anywhere."""
    if PROTECT:
        slot = cache_module.layer_share_picks(pools, keep)
        picks = [torch.zeros_like(p, dtype=torch.bool) for p in pools]
        for layer, head in PROTECT:
            picks[layer][:, head] = slot[layer][:, head]
    else:
        picks = cache_module.layer_share_picks(pools, (keep.double() * (1 - GLOBAL)).long())
    left = (keep.to(pools[0].device) - sum(pick.flatten(1).sum(dim=1) for pick in picks)).clamp(min=0)
    extra = cache_module.best_anywhere([p.masked_fill(pick, float("-inf")) for p, pick in zip(pools, picks)], left)
    return [pick | more for pick, more in zip(picks, extra)]


def _picks(self, keep, tail, lead, pool, observed):
    """The candidates' span, worth and which of them the chosen rule keeps."""
    bounds, pools = self.candidate_worth(tail=tail, lead=lead, pool=pool, observed=observed)
    if (RESERVE or SPLIT) and observed is not None:
        _, scores = self.candidate_worth(tail=tail, lead=lead, pool=pool)
        reserve = RESERVE or int(keep.max() * SPLIT)  # the bench reads one row
        return bounds, pools, cache_module.reserve_then_share(scores, pools, keep, reserve)
    if GLOBAL or PROTECT:
        return bounds, pools, _global_picks(pools, keep)
    return bounds, pools, cache_module.layer_share_picks(pools, keep)


def _mass_boost(seen, worth, pick):
    """MASS: per head ``(B, H)``, the bias its kept entries gain (see the module docstring)."""
    seen = seen.float().masked_fill(worth.isinf(), 0.0).clamp(min=0)
    total, kept = seen.sum(dim=2), (seen * pick).sum(dim=2)
    count, candidates = pick.sum(dim=2).clamp(min=1), worth.isfinite().sum(dim=2).clamp(min=1)
    ratio = torch.where(kept > 0, total / kept.clamp(min=1e-30), torch.ones_like(total))
    return MASS * torch.minimum(ratio.log(), (candidates / count).log()).clamp(min=0)


def keep_top_entries(self, keep, rotary_emb, *, tail=0, lead=None, pool=None, bias_mode="plain", observed=None):
    """The chosen rule; with MASS each head's kept entries biased by the mass its evicted ones had."""
    bounds, pools, picks = _picks(self, keep, tail, lead, pool, observed)
    moved = rotary_emb if self.position_mode == "cache" else None
    for index, (layer, (start, stop), pick) in enumerate(zip(self.layers, bounds, picks)):
        if observed is None or not MASS:
            cache_module._regroup_layer(layer, start, stop, pick, bias_mode, moved)
            layer.pack()
            continue
        boost = _mass_boost(observed[index][..., start:stop], pools[index], pick)
        # the boosts the kept entries carry already (straight-through nugget bias is 0 in value), in
        # the order _regroup_layer stores them: each head's in text order
        index, _ = cache_module.kept_in_text_order(pick)
        slots = index.shape[2]
        carried = layer.bias.expand(-1, pick.shape[1], -1)[..., start:stop].clamp(min=0).gather(2, index)
        cache_module._regroup_layer(layer, start, stop, pick, bias_mode, moved)
        middle = layer.bias[..., start : start + slots]
        lifted = torch.where(middle > cache_module.MASKED / 2, middle + carried + boost[..., None], middle)
        layer.bias = torch.cat([layer.bias[..., :start], lifted, layer.bias[..., start + slots :]], dim=2)
        layer.pack()


def _blend_worth(scores, seen):
    """The better of the score's percentile and ATTENTION_WEIGHT times the attention's."""
    percentiles = cache_module._percentiles
    return [torch.maximum(a, ATTENTION_WEIGHT * b) for a, b in zip(percentiles(scores), percentiles(seen))]


if __name__ == "__main__":
    cache_module._blend_worth = _blend_worth
    cache_module.NuggetCache.keep_top_entries = keep_top_entries
    sys.exit(main(sys.argv[1:]))
