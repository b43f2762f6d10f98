"""Several one-row nugget caches read as one batch, and each row's cache taken back after.

Batched decoding (``nugget2d.runtime.batched_decode``) stacks the caches of concurrent requests into
one :class:`NuggetCache` whose rows are padded on the left with masked slots (bias
:data:`~nugget2d.compress.attention.MASKED`, zero K/V) to the longest row, runs every decode step of
the batch as one forward pass over it, and gives each request back its own cache as if it had decoded
alone: its cache before the batch with the batch's new entries of its row appended
(:func:`unstack_row`). Only the public API of :class:`NuggetCache` and :class:`NuggetLayer` is used.

Per-head (packed) rows: the stacked layer is packed again (:meth:`NuggetLayer.pack`), so each row and
head reads only its entries in use and none of the padding; ``dense=True`` keeps it dense instead
(masked slots read and discarded by one kernel call per layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .attention import MASKED
from .cache import NuggetCache
from .cache_layer import NuggetLayer


def batch_key(cache: object) -> tuple | None:
    """What caches must share to be stacked into one batch (None: not a non-empty nugget cache, decoded alone)."""
    if not isinstance(cache, NuggetCache) or cache.batch_size == 0:
        return None
    keys = cache.layers[0].stored_kv()[0]
    return (
        cache.model_fingerprint,
        cache.position_mode,
        cache.allocation,
        tuple(cache.windows),
        keys.dtype,
        keys.device,
    )


def stack_caches(caches: Sequence[NuggetCache], dense: bool = False) -> NuggetCache:
    """One cache whose row ``i`` reads as ``caches[i]`` (each one row, all of one :func:`batch_key`),
    left-padded with masked slots to the longest. A layer packed in any of them is packed in the stack
    unless ``dense``. The given caches are left as they are."""
    if any(isinstance(cache, NuggetCache) and cache.batch_size != 1 for cache in caches):
        raise ValueError("stack_caches takes one-row caches; stack rows of larger ones with stack_rows")
    return stack_rows([(cache, 0) for cache in caches], dense)


def stack_rows(rows: Sequence[tuple[NuggetCache, int]], dense: bool = False) -> NuggetCache:
    """One cache whose row ``i`` reads as row ``rows[i][1]`` of cache ``rows[i][0]`` (all of one
    :func:`batch_key`; a stack's rows with their padding), left-padded with masked slots to the longest.
    A layer packed in any of them is packed in the stack unless ``dense``. The caches are left as they are."""
    keys = {batch_key(cache) for cache, _ in rows}
    if not rows or None in keys or len(keys) != 1:
        raise ValueError("stack_rows takes rows of one or more nugget caches of one model, position mode and dtype")
    first = rows[0][0]
    stacked = NuggetCache(
        len(first.layers), first.model_fingerprint, first.position_mode, first.allocation, first.windows
    )
    stacked.layers = [
        _stack_layers([(cache.layers[index], row) for cache, row in rows], dense) for index in range(len(first.layers))
    ]
    stacked.seen_tokens = torch.stack([_seen(cache)[row] for cache, row in rows])
    if any(cache.nugget_span is not None for cache, _ in rows):
        # rows never compressed per head count their nuggets as nugget_counts() does without a span
        counts = [cache.nugget_counts()[row].to(stacked.seen_tokens.device) for cache, row in rows]
        stacked.nugget_span = torch.stack(counts)
    return stacked


def unstack_row(stacked: NuggetCache, row: int, source: NuggetCache, appended: int) -> NuggetCache:
    """Row ``row``'s own cache: ``source`` (the cache stacked as that row) with the ``appended`` entries
    the batch's passes added to the row since it was stacked; ``source`` is left as it is."""
    own = source.fork()
    if appended == 0:
        return own
    for layer, batch in zip(own.layers, stacked.layers):
        # a sliding-window layer holds only its last entries: those of them are all the row keeps
        count = min(appended, batch.get_seq_length())
        keys, values = _last_kv(batch, count)
        positions = batch.positions[row : row + 1, ..., -count:]
        if positions.dim() == 3:  # appended tokens sit at one position in every head
            positions = positions[:, 0]
        layer.append(keys[row : row + 1], values[row : row + 1], batch.bias[row : row + 1, :1, -count:], positions)
        new = batch.scores[row : row + 1, ..., -count:]
        old = layer.scores[..., :-count]
        if new.dim() == 3 and old.dim() == 2:  # as set_scores widens a token-scored layer to per-head scores
            old = old[:, None, :].expand(-1, new.shape[1], -1)
        layer.scores = torch.cat([old, new], dim=-1)
        layer.trim()  # as the row's own passes would have (sliding-window layers)
    own.seen_tokens = stacked.seen_tokens[row : row + 1].clone()
    return own


def _seen(cache: NuggetCache) -> torch.Tensor:
    if cache.seen_tokens is not None:
        return cache.seen_tokens
    return torch.zeros(cache.batch_size, dtype=torch.long, device=cache.layers[0].device)


def _last_kv(layer: NuggetLayer, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``count`` keys and values of ``layer`` ``(B, Hkv, count, D)``, without rebuilding a
    packed layer: they are among the entries appended since it was packed (``stored_kv()``'s first two)."""
    tail_keys, tail_values = layer.stored_kv()[:2]
    if tail_keys.shape[2] < count:  # never in a stack: it is packed before its first pass
        keys, values = layer.keys, layer.values
        return keys[:, :, -count:], values[:, :, -count:]
    return tail_keys[:, :, -count:], tail_values[:, :, -count:]


def _stack_layers(rows: list[tuple[NuggetLayer, int]], dense: bool) -> NuggetLayer:
    """One layer of the stack: every row's entries, dense, left-padded with masked slots (one copy each)."""
    layers = [layer for layer, _ in rows]
    heads = layers[0].kv_heads
    longest = max(layer.get_seq_length() for layer in layers)
    bias_heads = heads if any(layer.bias.shape[1] > 1 for layer in layers) else 1
    head_positions = any(layer.positions.dim() == 3 for layer in layers)
    head_scores = any(layer.scores.dim() == 3 for layer in layers)
    first = layers[0]
    tail = first.stored_kv()[0]
    keys = tail.new_zeros(len(rows), heads, longest, tail.shape[-1])
    values = torch.zeros_like(keys)
    bias = first.bias.new_full((len(rows), bias_heads, longest), MASKED)
    positions = first.positions.new_zeros((len(rows), heads, longest) if head_positions else (len(rows), longest))
    flags = first.is_nugget.new_zeros((len(rows), longest))
    scores = first.scores.new_zeros((len(rows), heads, longest) if head_scores else (len(rows), longest))
    whole: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # a packed layer's K/V rebuilt once for all its rows
    for out, (layer, row) in enumerate(rows):
        if id(layer) not in whole:
            whole[id(layer)] = (layer.keys, layer.values)
        layer_keys, layer_values = whole[id(layer)]
        start = longest - layer.get_seq_length()
        keys[out, :, start:] = layer_keys[row]
        values[out, :, start:] = layer_values[row]
        bias[out, :, start:] = layer.bias[row]
        positions[out, ..., start:] = layer.positions[row]
        flags[out, start:] = layer.is_nugget[row]
        scores[out, ..., start:] = layer.scores[row]
    stacked = NuggetLayer(first.window)
    stacked.append(keys, values, bias, positions)
    stacked.is_nugget, stacked.scores = flags, scores
    if not dense and any(layer.packed for layer in layers):
        stacked.pack()
    return stacked
