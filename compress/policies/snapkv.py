"""``snapkv``: SnapKV/H2O-style eviction by the attention an entry has received."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import NuggetCache
from .base import CachePolicy, Leaving
from .observers import AttentionReceived, accumulate_attention
from .registry import register_policy


@register_policy
@dataclass
class SnapKV(CachePolicy):
    """Each entry's score is the attention it has received, summed over layers and heads, from the last
    ``window`` queries of every segment read since it arrived (H2O's accumulated attention, SnapKV's
    observation window); the top ``ceil(n·r)`` of a leaving block stay as plain K/V and overflow
    evicts the lowest."""

    name = "snapkv"
    window: int = 32

    def observer(self) -> AttentionReceived:
        return AttentionReceived(self.window)

    def after_read(self, cache: NuggetCache, observer: AttentionReceived, new: int) -> None:
        accumulate_attention(cache, observer.total, new)

    def choose(self, leaving: Leaving) -> list[int]:
        return [leaving.indices[i] for i in topk_in_order(leaving.scores[leaving.indices], leaving.count)]


def topk_in_order(scores: torch.Tensor, count: int) -> list[int]:
    """Positions of the ``count`` highest ``scores`` ``(n,)``, in increasing order (text order)."""
    count = max(0, min(count, scores.shape[0]))
    return sorted(int(i) for i in scores.float().topk(count).indices)
