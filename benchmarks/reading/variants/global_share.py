"""`nugget2d bench ...` with part of a per-head cache's budget spent across layers.

Sessions until 2026-11-30 afternoon (before the scorer reserve) gave each layer its share of the budget
(``nugget2d.compress.cache.layer_share_picks``: the layer's slots, each worth its best head's candidate
of that rank, compete for ``budget / heads`` openings; each head fills up to ``HEAD_SLOTS`` times its
layer's opened slots with its best candidates). GLOBAL=a spends only (1 - a) of the budget that way and
lets the best entries left, in any layer and head, take the rest (GLOBAL=1: every entry competes with
every other). HEAD_SLOTS=x sets the cap of the layer shares' part (default 3: a head may fill its whole
layer's share). Stored as sessions store (only the entries in use).
Usage (repository root): GLOBAL=a [HEAD_SLOTS=x] python benchmarks/reading/variants/global_share.py bench quality ...
"""

import os
import sys

from nugget2d.compress import cache as cache_module
from nugget2d.runtime.cli import main

#: GLOBAL=a: the layers' shares cover (1 - a) of the budget; the best entries left take the rest.
GLOBAL = float(os.environ.get("GLOBAL", "0"))
#: The cap on one head's slots in the layer shares' part.
HEAD_SLOTS = float(os.environ.get("HEAD_SLOTS", "3"))


def keep_top_entries(self, keep, rotary_emb, *, tail=0, lead=None, pool=None, bias_mode="plain", observed=None):
    """Layer shares for (1 - GLOBAL) of ``keep``, the best entries left anywhere for the rest."""
    bounds, pools = self.candidate_worth(tail=tail, lead=lead, pool=pool, observed=observed)
    shared = (keep.double() * (1 - GLOBAL)).long()
    picks = cache_module.layer_share_picks(pools, shared, HEAD_SLOTS)
    left = (keep.to(pools[0].device) - sum(pick.flatten(1).sum(dim=1) for pick in picks)).clamp(min=0)
    extra = cache_module.best_anywhere([p.masked_fill(pick, float("-inf")) for p, pick in zip(pools, picks)], left)
    picks = [pick | more for pick, more in zip(picks, extra)]
    moved = rotary_emb if self.position_mode == "cache" else None
    for layer, (start, stop), pick in zip(self.layers, bounds, picks):
        cache_module._regroup_layer(layer, start, stop, pick, bias_mode, moved)
        layer.pack()


if __name__ == "__main__":
    cache_module.NuggetCache.keep_top_entries = keep_top_entries
    sys.exit(main(sys.argv[1:]))
