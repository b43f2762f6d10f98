"""``full``: no compression — every token stays raw; the budget must hold the whole text."""

from __future__ import annotations

from dataclasses import dataclass

from .base import CachePolicy, Leaving
from .registry import register_policy


@register_policy
@dataclass
class Full(CachePolicy):
    """Keeps every entry as the unmodified model wrote it (the reference every policy is measured against)."""

    name = "full"
    keeps_leaving = False

    def choose(self, leaving: Leaving) -> list[int]:
        raise ValueError(
            f"policy 'full' keeps every token, and the text outgrew the cache budget ({len(leaving.indices)} tokens "
            "had to leave); raise --budget to hold the whole text, or choose a compressing policy"
        )
