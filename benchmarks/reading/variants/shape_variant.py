"""`nugget2d bench ...` with the bench's cache shape patched, for the variants in this directory.

SEG=N reads in N-token segments; RAWASK=recent keeps only the ``recent`` raw window before a question
(what sessions now do; without it, the rule before 2026-11-30: up to ``recent + segment``).
Usage (repository root): [SEG=N] [RAWASK=recent] python benchmarks/reading/variants/shape_variant.py bench quality ...
"""

import dataclasses
import os
import sys

from nugget2d.runtime import bench_common
from nugget2d.runtime import session as session_module
from nugget2d.runtime.cli import main

SEGMENT = int(os.environ.get("SEG", "0"))
SETTINGS = bench_common.CacheShape.settings


def settings(shape: bench_common.CacheShape):
    """The shape's settings, read in SEGMENT-token segments when SEG is set."""
    result = SETTINGS(shape)
    return dataclasses.replace(result, segment=SEGMENT) if SEGMENT and shape.method != "full" else result


def raw_when_asked(self, needed: int) -> int:
    """Before 2026-11-30 the raw tokens of the last segment stayed raw when asked; RAWASK=recent: the
    ``recent`` window only (the rule sessions now follow)."""
    limit = (
        self.settings.recent if os.environ.get("RAWASK") == "recent" else self.settings.recent + self.settings.segment
    )
    return min(self.raw, limit, self.settings.budget - self.settings.sinks - needed)


bench_common.CacheShape.settings = settings
session_module.StreamingSession._raw_when_asked = raw_when_asked
sys.exit(main(sys.argv[1:]))
