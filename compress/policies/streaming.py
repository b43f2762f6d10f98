"""``streaming``: StreamingLLM — the first ``sinks`` tokens and the latest ones; nothing else stays."""

from __future__ import annotations

from dataclasses import dataclass

from .base import CachePolicy, Leaving
from .registry import register_policy


@register_policy
@dataclass
class Streaming(CachePolicy):
    """Drops every token that leaves the raw window, so the raw window takes all the room the sinks leave."""

    name = "streaming"
    keeps_leaving = False

    def choose(self, leaving: Leaving) -> list[int]:
        return []
