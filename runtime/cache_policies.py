"""Cache policies: what becomes of the entries that leave a session's raw window (DESIGN §4, §8).

Every policy runs in the same :class:`~nugget2d.runtime.session.StreamingSession` and the same
generation loop, inside the same budget of cache entries; only the choice of kept entries differs:

* ``nugget2d`` — the scorer's top ``ceil(n·r)`` tokens of each leaving block become nuggets (their
  score rides on the attention logits); overflow evicts the lowest-scoring. The method.
* ``streaming`` — StreamingLLM: nothing is kept; the raw window takes all the room left after the
  sinks, so the cache holds the first ``sinks`` and the last ``budget - sinks`` tokens.
* ``snapkv`` — SnapKV/H2O-style eviction: each entry's score is the attention it has received,
  summed over layers and heads, from the last :data:`OBSERVATION_WINDOW` queries of every segment
  encoded since it arrived (H2O's accumulated attention, SnapKV's observation window); the top
  ``ceil(n·r)`` of a leaving block stay as plain K/V and overflow evicts the lowest.
* ``compressive`` — the paper's COMPRESSIVE baseline: a leaving block of ``n`` entries is cut into
  ``ceil(n·r)`` groups of consecutive entries and each group becomes one entry holding the mean of
  its values and of its keys (all brought to the group's last position first, so the mean key is a
  key rotated at that position); overflow evicts the oldest pooled entries.
"""

from __future__ import annotations

import torch
from torch import nn

from nugget2d.compress import NuggetCache
from nugget2d.compress.rope import rerotate

POLICIES = ("nugget2d", "streaming", "snapkv", "compressive")
#: Queries at the end of each encoded segment whose attention scores the keys (SnapKV's window).
OBSERVATION_WINDOW = 32


def check_policy(name: str) -> str:
    """``name`` if it is a known policy; otherwise ``ValueError`` listing the choices."""
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {list(POLICIES)}")
    return name


def topk_in_order(scores: torch.Tensor, count: int) -> list[int]:
    """Positions of the ``count`` highest ``scores`` ``(n,)``, in increasing order (text order)."""
    count = max(0, min(count, scores.shape[0]))
    return sorted(int(i) for i in scores.float().topk(count).indices)


def group_bounds(length: int, groups: int) -> list[tuple[int, int]]:
    """``groups`` contiguous ``[begin, end)`` ranges covering ``range(length)``, sizes differing by at most 1."""
    if not 0 < groups <= length:
        raise ValueError(f"cannot cut {length} entries into {groups} non-empty groups")
    edges = [round(i * length / groups) for i in range(groups + 1)]
    return list(zip(edges[:-1], edges[1:]))


def pool_groups(cache: NuggetCache, indices: list[int], groups: int, rotary_emb: nn.Module) -> list[int]:
    """Mean-pool ``indices`` (cache entries, in order) in ``groups`` groups of consecutive entries.

    Each group's last entry becomes, at every layer, the mean of the group's values and the mean of
    its keys re-rotated to that entry's position; the returned list holds those entries (one per
    group). The other members are left for the caller to drop. Tensors are replaced, never written
    in place, so forks sharing them are unaffected.
    """
    bounds = group_bounds(len(indices), groups)
    device = cache.layers[0].keys.device
    members = torch.tensor(indices, device=device)
    group_of = torch.tensor([g for g, (a, b) in enumerate(bounds) for _ in range(a, b)], device=device)
    slots = torch.tensor([indices[b - 1] for _, b in bounds], device=device)
    sizes = torch.tensor([b - a for a, b in bounds], device=device, dtype=torch.float32)[:, None]
    for layer in cache.layers:
        delta = layer.positions[:, slots[group_of]] - layer.positions[:, members]
        moved = rerotate(layer.keys[:, :, members], delta, rotary_emb)
        layer.keys = layer.keys.index_copy(2, slots, _group_mean(moved, group_of, sizes).to(layer.keys.dtype))
        pooled_values = _group_mean(layer.values[:, :, members], group_of, sizes).to(layer.values.dtype)
        layer.values = layer.values.index_copy(2, slots, pooled_values)
    return [int(s) for s in slots]


def _group_mean(rows: torch.Tensor, group_of: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """``(B, H, m, D)`` → ``(B, H, G, D)``: the mean of the rows of each group."""
    batch, heads, _, dim = rows.shape
    sums = rows.new_zeros(batch, heads, sizes.shape[0], dim, dtype=torch.float32)
    return sums.index_add_(2, group_of, rows.float()) / sizes


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


class _LastQueriesObserver:
    """A cache observer of the attention from the last ``window`` queries of each forward pass."""

    def __init__(self, window: int = OBSERVATION_WINDOW) -> None:
        if window < 1:
            raise ValueError(f"the observation window must be >= 1 query, got {window}")
        self.window = window


class AttentionReceived(_LastQueriesObserver):
    """A cache observer that sums the softmax attention each key receives from the last ``window``
    queries of a forward pass, over all layers and query heads: :attr:`total` ``(B, K)``."""

    def __init__(self, window: int = OBSERVATION_WINDOW) -> None:
        super().__init__(window)
        self.total: torch.Tensor | None = None

    def __call__(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None, scaling: float
    ) -> None:
        """Add this layer's attention from the last queries (shapes as :func:`attention_from_last_queries`)."""
        received = attention_from_last_queries(query, key, bias, scaling, self.window).sum(dim=1)
        self.total = received if self.total is None else self.total + received


class HeadAttentionReceived(_LastQueriesObserver):
    """A cache observer keeping, per layer, the attention each key receives from the last ``window``
    queries of the latest forward pass, per KV head (its query heads summed): :attr:`by_layer`
    ``{layer: (B, Hkv, K)}``."""

    def __init__(self, window: int = OBSERVATION_WINDOW) -> None:
        super().__init__(window)
        self.by_layer: dict[int, torch.Tensor] = {}

    def __call__(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None, scaling: float
    ) -> None:
        """Record this layer's attention from the last queries (shapes as :func:`attention_from_last_queries`)."""
        self.by_layer[layer_idx] = attention_from_last_queries(query, key, bias, scaling, self.window)

    def layers(self, count: int) -> list[torch.Tensor]:
        """The record of layers ``0 … count - 1``, in order; ``RuntimeError`` if one was never seen."""
        missing = [i for i in range(count) if i not in self.by_layer]
        if missing:
            raise RuntimeError(f"no attention was observed in layers {missing}: the backend did not call the observer")
        return [self.by_layer[i] for i in range(count)]


def accumulate_attention(cache: NuggetCache, received: torch.Tensor, new: int) -> None:
    """Make every entry's score the attention it has received so far: the ``new`` entries just
    appended start from 0 (their scorer scores are dropped), then ``received`` ``(B, K)`` is added."""
    scores = cache.layers[0].scores.clone()
    scores[:, scores.shape[1] - new :] = 0.0
    scores = scores + received.to(scores.device)
    for layer in cache.layers:
        layer.scores = scores
