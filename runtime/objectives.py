"""The training objective as a module DeepSpeed can wrap: the cache a session would hold for the
context, then the decoder's cross-entropy on the target."""

from __future__ import annotations

import torch
from torch import nn

from nugget2d.compress import Nugget2DModel, NuggetCache


class NuggetObjective(nn.Module):
    """``forward(batch) -> loss`` for a collated batch (see ``train_data.collate``)."""

    def __init__(self, model: Nugget2DModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        input_ids: torch.Tensor,
        input_mask: torch.Tensor,
        labels: torch.Tensor,
        sinks: torch.Tensor | None = None,
        sinks_mask: torch.Tensor | None = None,
        recent: torch.Tensor | None = None,
        recent_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-entropy of the targets read over the cache of :meth:`cache`."""
        cache = self.cache(context, context_mask, sinks, sinks_mask, recent, recent_mask)
        return self.model(input_ids, nuggets=cache, attention_mask=input_mask, labels=labels).loss

    def cache(
        self,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        sinks: torch.Tensor | None = None,
        sinks_mask: torch.Tensor | None = None,
        recent: torch.Tensor | None = None,
        recent_mask: torch.Tensor | None = None,
    ) -> NuggetCache:
        """[raw sinks | nuggets of the context | raw recent], as a streaming session holds it
        (DESIGN §4); without sinks and recent, the nuggets alone."""
        cache = None if sinks is None else self.model.encode(sinks, sinks_mask, allow_empty_rows=True)
        cache = self.model.compress(context, context_mask, cache=cache)
        if recent is not None:
            cache = self.model.encode(recent, recent_mask, cache=cache, allow_empty_rows=True)
        return cache
