"""How much each context K/V matters to the frozen model, per (layer, KV head, token) (docs/design.md).

KVzip's signal: teacher-force the frozen model on ``[context, repeat instruction, context again]``
and give every context key/value, at each layer and KV head, the largest attention probability any
*repeat* query of that head's group puts on it. SnapKV's signal — the same statistic from the last
:data:`WINDOW` queries of the context itself, on the keys before that window (inside it every key
is looked at by its own query and the next, which says nothing about later use) — is blended in by
taking the max: both are "the most one query ever looks at this entry", so they share units and
need no weight, and an entry ranks high if either recall (repeat) or continuation (window) needs it.

The numbers come from the runtime's own attention code: one chunked, no-grad pass of the frozen
model (adapters off) over a fresh :class:`~nugget2d.compress.NuggetCache` whose observer sees every
layer's queries and keys. :func:`frozen_forward` is that pass, also the KL teacher of training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nugget2d.compress import Nugget2DModel, NuggetCache

#: The instruction between the context and its copy (KVzip's repeat prompt).
REPEAT_INSTRUCTION = "\n\nRepeat the previous context exactly.\n\n"
#: Last queries of the context whose attention also counts (SnapKV's observation window).
WINDOW = 32
#: Query columns per forward chunk: the observer's attention probabilities are (B, heads, CHUNK, keys).
CHUNK = 256


@dataclass
class Importance:
    """``scores`` ``(B, layers, kv_heads, T)``: each context entry's importance (0 on padding);
    ``features`` ``(B, T, hidden)``: the frozen model's hidden states after ``features_layer``
    layers over the context (what the scorer reads), or None when not asked for."""

    scores: torch.Tensor
    features: torch.Tensor | None = None


def plain_cache(model: Nugget2DModel) -> NuggetCache:
    """An empty token-level cache numbering tokens by text position, as a plain KV cache does."""
    return NuggetCache(model.num_layers, model.fingerprint, positions="original")


def frozen_forward(
    model: Nugget2DModel,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    cache: NuggetCache | None = None,
    lm_head: bool = False,
    **kwargs,
):
    """One pass of the frozen base model (no LoRA) over ``input_ids`` ``(B, n)`` appended to
    ``cache`` (a fresh one by default), numbering tokens by text position (padding slots, anywhere
    in a row, are skipped); the decoder body's output, or the LM's with ``lm_head``."""
    cache = plain_cache(model) if cache is None else cache
    mask = mask.to(device=input_ids.device, dtype=torch.bool)
    module = model.base if lm_head else model.base.get_decoder()
    return model.forward_pass(cache, input_ids, mask, None, module, score=False, **kwargs)


@torch.no_grad()
def kv_importance(
    model: Nugget2DModel,
    context: torch.Tensor,
    context_mask: torch.Tensor,
    repeat: torch.Tensor,
    repeat_mask: torch.Tensor,
    window: int = WINDOW,
    chunk: int = CHUNK,
    features_layer: int | None = None,
) -> Importance:
    """Importance ``(B, layers, kv_heads, T)`` (≥ 0, 0 on padding) of each context entry: the max
    attention probability it receives, over the query heads of its KV group, from the real ``repeat``
    queries (``(B, R)``: the instruction and the context again) and — entries before the window
    only — from the last ``window`` real context queries. ``context`` is right-padded ``(B, T)``;
    ``features_layer`` also returns the hidden states after that many layers over the context.
    A sliding-window layer's entries are never compressed, so nobody watches them: their importance is 0."""
    context_mask, repeat_mask = context_mask.bool(), repeat_mask.bool()
    if window < 0 or chunk < 1:
        raise ValueError(f"window must be >= 0 and chunk >= 1, got window={window}, chunk={chunk}")
    if not bool(context_mask.any(dim=1).all()):
        raise ValueError("every row needs at least one context token (a context_mask row is all zeros)")
    ids, mask, lengths = _pack(context, context_mask, repeat, repeat_mask)
    width, length = ids.shape[1], context.shape[1]
    columns = torch.arange(width, device=ids.device)[None, :]
    repeat_queries = (columns >= lengths[:, None]) & mask
    window_queries = (columns >= lengths[:, None] - window) & (columns < lengths[:, None])
    before_window = (lengths - window).clamp(min=0)[:, None]
    reach = torch.where(repeat_queries, lengths[:, None], torch.where(window_queries, before_window, 0))
    observer = _MaxAttention(model.num_layers, reach, length)
    cache = plain_cache(model)
    cache.observer = observer
    features = []
    for begin in range(0, width, chunk):
        part = slice(begin, min(width, begin + chunk))
        wants_features = features_layer is not None and begin < length
        out = frozen_forward(model, ids[:, part], mask[:, part], cache, output_hidden_states=wants_features)
        if wants_features:
            features.append(out.hidden_states[features_layer])
    keys = torch.arange(length, device=ids.device)[None, :] < lengths[:, None]
    unseen = torch.zeros(ids.shape[0], model.num_kv_heads, length, device=ids.device)  # sliding-window layers
    scores = torch.stack([unseen if b is None else b for b in observer.best], dim=1) * keys[:, None, None, :]
    hidden = torch.cat(features, dim=1)[:, :length] if features else None
    return Importance(scores, hidden)


def _pack(
    context: torch.Tensor, context_mask: torch.Tensor, repeat: torch.Tensor, repeat_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``[context, repeat]`` (real tokens only, wherever the padding was), right-padded:
    ``(ids, mask, context lengths)``; a row's context occupies columns ``0 .. length - 1``."""
    lengths = context_mask.sum(dim=1)
    width = int((lengths + repeat_mask.sum(dim=1)).max())
    ids = context.new_zeros(context.shape[0], width)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for row in range(context.shape[0]):
        tokens = torch.cat([context[row][context_mask[row]], repeat[row][repeat_mask[row]]])
        ids[row, : tokens.shape[0]], mask[row, : tokens.shape[0]] = tokens, True
    return ids, mask, lengths.to(ids.device)


class _MaxAttention:
    """Cache observer: per layer, the running max attention probability each of the first
    ``length`` keys receives, per KV head, from the query columns of ``reach`` ``(B, width)``: the
    query at column ``c`` of row ``b`` counts for keys ``0 .. reach[b, c] - 1`` (0: not at all)."""

    def __init__(self, num_layers: int, reach: torch.Tensor, length: int) -> None:
        self.reach, self.length = reach, length
        self.best: list[torch.Tensor | None] = [None] * num_layers

    def __call__(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None, scaling: float
    ) -> None:
        batch, q_heads, q_len, dim = query.shape
        kv_heads, k_len = key.shape[1], key.shape[2]
        if self.best[layer_idx] is None:
            self.best[layer_idx] = query.new_zeros(batch, kv_heads, self.length, dtype=torch.float32)
        reach = self.reach[:, k_len - q_len : k_len]
        columns = (reach > 0).any(dim=0).nonzero().squeeze(1)
        if columns.numel() == 0:
            return
        groups = q_heads // kv_heads
        q = query[:, :, columns].float().reshape(batch, kv_heads, groups * columns.numel(), dim)
        logits = torch.matmul(q, key.float().transpose(-1, -2)) * scaling
        logits = logits.view(batch, kv_heads, groups, columns.numel(), k_len)
        if bias is not None:
            logits = logits + bias.float()[:, :, None, None, :]
        keys = torch.arange(k_len, device=key.device)
        unseen = keys[None, :] > (columns + k_len - q_len)[:, None]  # causal: the queries are the last keys
        probs = logits.masked_fill(unseen, float("-inf")).softmax(dim=-1)[..., : self.length]
        counted = keys[None, None, : probs.shape[-1]] < reach[:, columns, None]  # (B, columns, keys)
        received = (probs * counted[:, None, None]).amax(dim=(2, 3))
        width = received.shape[-1]
        best = self.best[layer_idx]
        self.best[layer_idx] = torch.cat([torch.maximum(best[..., :width], received), best[..., width:]], dim=-1)
