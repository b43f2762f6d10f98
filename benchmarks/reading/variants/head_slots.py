"""`nugget2d bench ...` with a cap on how many slots one KV head may fill in a per-head cache.

Sessions let a head take as much of its layer's share as its candidates win
(``nugget2d.compress.cache.HEAD_SLOTS`` = None; each head of a packed layer is read at its own
length). HEAD_SLOTS=x caps a head at x times its layer's opened slots (1: every head fills the
opened slots and no more, the rule shipped 2026-11-30 until per-head reading).
Usage (repository root): HEAD_SLOTS=x python benchmarks/reading/variants/head_slots.py bench quality|speed ...
"""

import os
import sys

from nugget2d.compress import cache as cache_module
from nugget2d.runtime.cli import main

if __name__ == "__main__":
    cache_module.HEAD_SLOTS = float(os.environ["HEAD_SLOTS"]) if os.environ.get("HEAD_SLOTS") else None
    sys.exit(main(sys.argv[1:]))
