"""The nugget scorer: an MLP over the layer-λ hidden states that scores each token, either once
(token-level nuggets) or once per (layer, KV head) (per-head budgets, docs/design.md)."""

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
