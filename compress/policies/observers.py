"""Watching attention while a segment is read: what the attention-based policies decide on.

The attention backends call a cache's ``observer(layer_idx, query, key, bias, scaling)`` on every
forward pass over it (:attr:`~nugget2d.compress.NuggetCache.observer`); these observers turn the
last queries' attention into per-entry totals.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..attention import parts_logits
from ..cache import NuggetCache


def attention_from_last_queries(
    query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None, scaling: float, window: int
) -> torch.Tensor:
    """The softmax attention ``(B, Hkv, K)`` each key receives from the last ``window`` queries, summed
    over them and over the query heads sharing each KV head (``query`` ``(B, Hq, Q, D)``, ``key``
    ``(B, Hkv, K, D)``, ``bias`` ``(B, 1 | Hkv, K)``; causal, the queries are the last keys)."""
    with torch.no_grad():
        batch, query_heads, _, dim = query.shape
        kv_heads, k_len = key.shape[1], key.shape[2]
        q = query[:, :, -window:]
        q_len, groups = q.shape[2], query_heads // kv_heads
        # query head h reads KV head h // groups: group the queries instead of repeating the keys
        q = q.reshape(batch, kv_heads, groups * q_len, dim).float()
        logits = torch.matmul(q, key.float().transpose(-1, -2)) * scaling
        if bias is not None:
            logits = logits + bias[:, :, None, :].float()
        rows = torch.arange(q_len, device=q.device).repeat(groups)[:, None] + (k_len - q_len)
        hidden = torch.arange(k_len, device=q.device)[None, :] > rows
        return logits.masked_fill(hidden, float("-inf")).softmax(dim=-1).sum(dim=2)


def packed_attention_from_last_queries(query: torch.Tensor, layer, scaling: float, window: int) -> torch.Tensor:
    """:func:`attention_from_last_queries` over a packed layer (a :class:`~nugget2d.compress.cache.NuggetLayer`),
    each KV head read over its own entries where they lie (:meth:`NuggetLayer.head_entries`), never over the
    layer rebuilt with its masked slots; ``(B, Hkv, K)`` over its slots, 0 at a head's masked ones."""
    with torch.no_grad():
        in_use = layer.slots_in_use()
        batch, kv_heads, slots = in_use.shape
        groups = query.shape[1] // kv_heads
        q = query[:, :, -window:].float()
        received = q.new_zeros(batch, kv_heads, layer.get_seq_length())
        for row, heads in enumerate(layer.head_entries(joined=False)):
            for head, (keys, _, bias) in enumerate(heads):
                own = q[row, head * groups : (head + 1) * groups]  # (groups, window, D)
                weights = parts_logits(own, keys, bias, scaling).softmax(dim=-1).sum(dim=(0, 1))
                used = keys[0].shape[0]
                received[row, head, :slots][in_use[row, head]] = weights[:used]
                received[row, head, slots:] = weights[used:]
        return received


class _LastQueriesObserver(ABC):
    """A cache observer of the attention from the last ``window`` queries of each forward pass; the
    backends call it with the layer's keys, or :meth:`observe_packed` with a packed layer."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"the observation window must be >= 1 query, got {window}")
        self.window = window

    def __call__(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None, scaling: float
    ) -> None:
        """Take this layer's attention from the last queries (shapes as :func:`attention_from_last_queries`)."""
        self.add(layer_idx, attention_from_last_queries(query, key, bias, scaling, self.window))

    def observe_packed(self, layer_idx: int, query: torch.Tensor, layer, scaling: float) -> None:
        """:meth:`__call__` for a packed layer, read head by head where its entries lie."""
        self.add(layer_idx, packed_attention_from_last_queries(query, layer, scaling, self.window))

    @abstractmethod
    def add(self, layer_idx: int, received: torch.Tensor) -> None:
        """Take one layer's attention ``(B, Hkv, K)`` from the last queries."""


class AttentionReceived(_LastQueriesObserver):
    """Sums the softmax attention each key receives from the last ``window`` queries of a forward pass,
    over all layers and query heads: :attr:`total` ``(B, K)``."""

    def __init__(self, window: int) -> None:
        super().__init__(window)
        self.total: torch.Tensor | None = None

    def add(self, layer_idx: int, received: torch.Tensor) -> None:
        """Add this layer's attention, summed over its KV heads."""
        received = received.sum(dim=1)
        self.total = received if self.total is None else self.total + received


class HeadAttentionReceived(_LastQueriesObserver):
    """Keeps, per layer, the attention each key receives from the last ``window`` queries of the latest
    forward pass, per KV head (its query heads summed): :attr:`by_layer` ``{layer: (B, Hkv, K)}``."""

    def __init__(self, window: int) -> None:
        super().__init__(window)
        self.by_layer: dict[int, torch.Tensor] = {}

    def add(self, layer_idx: int, received: torch.Tensor) -> None:
        """Record this layer's attention per KV head."""
        self.by_layer[layer_idx] = received

    def layers(self, indices: int | list[int]) -> list[torch.Tensor]:
        """The record of layers ``indices`` (a count ``n``: layers ``0 … n - 1``), in order; ``RuntimeError`` if
        one was never seen (the backends do not watch sliding-window layers)."""
        indices = list(range(indices)) if isinstance(indices, int) else list(indices)
        missing = [i for i in indices if i not in self.by_layer]
        if missing:
            raise RuntimeError(f"no attention was observed in layers {missing}: the backend did not call the observer")
        return [self.by_layer[i] for i in indices]


def accumulate_attention(cache: NuggetCache, received: torch.Tensor, new: int) -> None:
    """Make every entry's score the attention it has received so far: the ``new`` entries just
    appended start from 0 (their scorer scores are dropped), then ``received`` ``(B, K)`` is added (at the
    global layers; ``received`` None — nothing watched, every layer slides — leaves the scores)."""
    if received is None:
        return
    scores = cache.main_layer.scores.clone()
    scores[:, scores.shape[1] - new :] = 0.0
    scores = scores + received.to(scores.device)
    for index in cache.compressed_layers:
        cache.layers[index].scores = scores
