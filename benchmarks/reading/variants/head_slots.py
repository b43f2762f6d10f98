"""`nugget2d bench ...` with another cap on how many slots one KV head may fill in a per-head cache.

Sessions let a head fill its layer's opened slots and no more (``nugget2d.compress.cache.HEAD_SLOTS``
= 1). HEAD_SLOTS=x lets a head take up to x times as many when its layer's other heads have weaker
candidates (the layer's share of entries stays the same; it is then read at its busiest head's length).
Usage (repository root): HEAD_SLOTS=x python benchmarks/reading/variants/head_slots.py bench quality|speed ...
"""

import os
import sys

from nugget2d.compress import cache as cache_module
from nugget2d.runtime.cli import main

if __name__ == "__main__":
    cache_module.HEAD_SLOTS = float(os.environ.get("HEAD_SLOTS", "1"))
    sys.exit(main(sys.argv[1:]))
