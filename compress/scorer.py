"""The nugget scorer: an MLP that gives each token a scalar importance score."""

from __future__ import annotations

import torch
from torch import nn


class Scorer(nn.Module):
    """``Linear(h, h) -> ReLU -> Linear(h, 1)`` over hidden states (DESIGN §1)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 1))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Scores of shape ``(batch, tokens)`` in float32 for hidden states ``(batch, tokens, hidden)``."""
        weight = self.net[0].weight
        return self.net(hidden_states.to(weight.dtype)).squeeze(-1).float()
