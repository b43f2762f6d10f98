"""The nugget scorer: an MLP over the layer-λ hidden states that scores each token, either once
(token-level nuggets) or once per (layer, KV head) (per-head budgets, docs/design.md); and a union of
scorers fitted to different text, which keeps what any of them ranks high."""

from __future__ import annotations

import torch
from torch import nn


class Scorer(nn.Module):
    """``Linear(h, h) -> ReLU -> Linear(h, outputs)`` over hidden states (docs/design.md).

    ``heads=None`` gives one score per token; ``heads=(layers, kv_heads)`` gives one per token and
    (layer, KV head), so the cache can spend its budget unevenly across layers and heads.
    """

    def __init__(self, hidden_size: int, heads: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.heads = tuple(heads) if heads is not None else None
        outputs = 1 if heads is None else heads[0] * heads[1]
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, outputs))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """float32 scores for hidden states ``(batch, tokens, hidden)``: ``(batch, tokens)`` for a
        token scorer, ``(batch, tokens, layers, kv_heads)`` for a per-head one."""
        weight = self.net[0].weight
        out = self.net(hidden_states.to(weight.dtype)).float()
        if self.heads is None:
            return out.squeeze(-1)
        return out.unflatten(-1, self.heads)


class UnionScorer(nn.Module):
    """Several :class:`Scorer` members; an entry's score is the best of its members' scores, each
    standardised by one mean and spread of that member's scores over a calibration text
    (:meth:`calibrate`). One mean and spread per member, not per (layer, head), so each member's
    spread of the budget over layers and heads stands; the top of the union is the top of each member
    (``benchmarks/needles/``: a scorer fitted on books and one fitted on planted facts)."""

    def __init__(self, hidden_size: int, heads: tuple[int, int] | None, members: int) -> None:
        super().__init__()
        if members < 2:
            raise ValueError(f"a union of scorers needs at least 2 members, got {members}")
        self.heads = tuple(heads) if heads is not None else None
        self.members = nn.ModuleList(Scorer(hidden_size, heads) for _ in range(members))
        self.register_buffer("center", torch.zeros(members))
        self.register_buffer("spread", torch.ones(members))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """float32 scores shaped as one member's: each member's standardised score, the best of them."""
        members = zip(self.members, self.center, self.spread)
        return torch.stack([(member(hidden_states) - center) / spread for member, center, spread in members]).amax(0)

    @torch.no_grad()
    def calibrate(self, hidden_states: torch.Tensor) -> None:
        """Set each member's mean and spread to those of all its scores over ``hidden_states``
        ``(batch, tokens, hidden)`` (every token, layer and head together)."""
        for index, member in enumerate(self.members):
            scores = member(hidden_states)
            spread = scores.std()
            if scores.numel() < 2 or not spread > 0:
                raise ValueError("calibration needs scores that differ: give a longer calibration text")
            self.center[index], self.spread[index] = scores.mean(), spread


def make_scorer(hidden_size: int, heads: tuple[int, int] | None, members: int = 1) -> Scorer | UnionScorer:
    """One :class:`Scorer`, or a :class:`UnionScorer` of ``members`` (> 1) of them."""
    return Scorer(hidden_size, heads) if members == 1 else UnionScorer(hidden_size, heads, members)
