"""`nugget2d bench ...` with each KV head keeping at most a share of its candidates.

Under the slot rule (shipped before the scorer reserve) a few heads (layers 18, 21 and 23, head 2 of
SmolLM2-135M) score nearly every token high and keep nearly all of them. POOL_CAP=f drops each head's
candidates beyond its best f of them before the layers' shares are set (a layer's slot of rank k is then
worth its best head's k-th kept candidate), so those heads keep at most a fraction f of the text.
Usage (repository root): POOL_CAP=f python benchmarks/reading/variants/head_pool_cap.py bench quality ...
"""

import os
import sys

import torch

from nugget2d.compress import cache as cache_module
from nugget2d.runtime.cli import main

POOL_CAP = float(os.environ.get("POOL_CAP", "1"))
_shipped_picks = cache_module.layer_share_picks


def capped_picks(pools: list[torch.Tensor], keep: torch.Tensor, head_slots: float | None = None) -> list[torch.Tensor]:
    """The shipped rule over pools where each head's candidates beyond its best POOL_CAP share are dropped."""
    capped = []
    for pool in pools:
        finite = pool.isfinite().sum(dim=2, keepdim=True)
        rank = pool.argsort(dim=2, descending=True, stable=True).argsort(dim=2)
        capped.append(pool.masked_fill(rank >= (finite.float() * POOL_CAP).ceil().long(), float("-inf")))
    return _shipped_picks(capped, keep, head_slots)


if __name__ == "__main__":
    cache_module.layer_share_picks = capped_picks
    sys.exit(main(sys.argv[1:]))
