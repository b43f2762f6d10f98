"""``nugget2d``: the method — the scorer's top tokens become nuggets whose score rides on attention."""

from __future__ import annotations

from dataclasses import dataclass

from .base import CachePolicy, Leaving
from .registry import register_policy


@register_policy
@dataclass
class Nugget2D(CachePolicy):
    """The encoder adapter writes the cache; of a leaving block the scorer's top ``ceil(n·r)`` tokens
    (or those above the adapter's threshold) stay as nuggets, their score added to every attention
    logit towards them; overflow evicts the lowest-scoring. With a per-head scorer,
    :class:`~nugget2d.compress.policies.PerHeadBudget` spreads the budget over layers and KV heads."""

    name = "nugget2d"
    reads_with_encoder = True
    makes_nuggets = True
    scores_heads = True

    def choose(self, leaving: Leaving) -> list[int]:
        chosen, _ = leaving.model.select(leaving.scores[leaving.indices][None], ratio=leaving.ratio)
        return [leaving.indices[int(i)] for i in chosen[0]]
