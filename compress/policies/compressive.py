"""``compressive``: the Nugget2D paper's COMPRESSIVE baseline — mean-pooled groups of consecutive tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import NuggetCache
from ..rope import Rotary, layer_rotary, rerotate
from .base import CachePolicy, Leaving
from .registry import register_policy


@register_policy
@dataclass
class Compressive(CachePolicy):
    """A leaving block of ``n`` entries is cut into ``ceil(n·r)`` groups of consecutive entries and each
    group becomes one entry holding the mean of its values and of its keys (all brought to the group's
    last position first, so the mean key is a key rotated at that position); overflow evicts the oldest."""

    name = "compressive"

    def choose(self, leaving: Leaving) -> list[int]:
        return pool_groups(leaving.cache, leaving.indices, leaving.count, leaving.model.rotary_emb)

    def evict(self, kept: list[int], scores: torch.Tensor, remove: int) -> list[int]:
        return kept[remove:]


def group_bounds(length: int, groups: int) -> list[tuple[int, int]]:
    """``groups`` contiguous ``[begin, end)`` ranges covering ``range(length)``, sizes differing by at most 1."""
    if not 0 < groups <= length:
        raise ValueError(f"cannot cut {length} entries into {groups} non-empty groups")
    edges = [round(i * length / groups) for i in range(groups + 1)]
    return list(zip(edges[:-1], edges[1:]))


def pool_groups(cache: NuggetCache, indices: list[int], groups: int, rotary_emb: Rotary) -> list[int]:
    """Mean-pool ``indices`` (cache entries, in order) in ``groups`` groups of consecutive entries.

    Each group's last entry becomes, at every global layer, the mean of the group's values and the mean
    of its keys re-rotated to that entry's position (``rotary_emb``: one rotary, or one per layer); the
    returned list holds those entries (one per group). The other members are left for the caller to
    drop. Tensors are replaced, never written in place, so forks sharing them are unaffected.
    """
    bounds = group_bounds(len(indices), groups)
    device = cache.main_layer.keys.device
    members = torch.tensor(indices, device=device)
    group_of = torch.tensor([g for g, (a, b) in enumerate(bounds) for _ in range(a, b)], device=device)
    slots = torch.tensor([indices[b - 1] for _, b in bounds], device=device)
    sizes = torch.tensor([b - a for a, b in bounds], device=device, dtype=torch.float32)[:, None]
    for index in cache.compressed_layers:
        layer = cache.layers[index]
        delta = layer.positions[:, slots[group_of]] - layer.positions[:, members]
        moved = rerotate(layer.keys[:, :, members], delta, layer_rotary(rotary_emb, index))
        layer.keys = layer.keys.index_copy(2, slots, _group_mean(moved, group_of, sizes).to(layer.keys.dtype))
        pooled_values = _group_mean(layer.values[:, :, members], group_of, sizes).to(layer.values.dtype)
        layer.values = layer.values.index_copy(2, slots, pooled_values)
    return [int(s) for s in slots]


def _group_mean(rows: torch.Tensor, group_of: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """``(B, H, m, D)`` → ``(B, H, G, D)``: the mean of the rows of each group."""
    batch, heads, _, dim = rows.shape
    sums = rows.new_zeros(batch, heads, sizes.shape[0], dim, dtype=torch.float32)
    return sums.index_add_(2, group_of, rows.float()) / sizes
