"""The training objective as a module DeepSpeed can wrap: nuggets of the context, then the
decoder's cross-entropy on the target."""

from __future__ import annotations

import torch
from torch import nn

from nugget2d.compress import Nugget2DModel


class NuggetObjective(nn.Module):
    """``forward(batch) -> loss`` for a collated batch (see ``train_data.collate``)."""

    def __init__(self, model: Nugget2DModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, context, context_mask, input_ids, input_mask, labels) -> torch.Tensor:
        nuggets = self.model.compress(context, context_mask)
        return self.model(input_ids, nuggets=nuggets, attention_mask=input_mask, labels=labels).loss
