"""Attention with a per-key additive bias: ``softmax(q kᵀ · scale + b) v`` (docs/design.md).

One operation, four backends, each registered in transformers' ``AttentionInterface`` as
``nugget2d_<backend>`` so the stock model code calls it. The bias ``b`` has shape
``(batch, 1 | kv_heads, keys)``: the score of a nugget key, 0 for a raw token, :data:`MASKED` for
a padding slot. Causal attention is bottom-right aligned: the queries are the last ``Q`` keys. As
transformers' own backends do, they honour the module's ``scaling`` (Gemma's ``query_pre_attn_scalar``),
a layer's ``sliding_window`` (a query sees the keys less than that many places back) and ``softcap``
(``softcap · tanh(logits / softcap)`` before the bias, Gemma 2).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

#: Bias of a key no query may see. Finite so a fully masked row gives no NaN.
MASKED = -1e9
#: Floor for the bias in the flash-attention column: exp(-1e4) is 0 in every float type, and the
#: column value stays finite in fp16/bf16.
_FLASH_BIAS_FLOOR = -1e4

BACKENDS = ("eager", "sdpa", "flex", "flash_attn")

Kernel = Callable[..., torch.Tensor]


def biased_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    scaling: float | None = None,
    causal: bool = True,
    backend: str = "sdpa",
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``softmax(q kᵀ · scaling + bias) v`` with grouped-query heads; returns ``(B, Hq, Q, D)``.

    ``query`` is ``(B, Hq, Q, D)``, ``key``/``value`` ``(B, Hkv, K, D)`` with ``Hq`` a multiple of
    ``Hkv``, ``bias`` ``(B, 1 | Hkv, K)`` or None. ``scaling`` defaults to ``D ** -0.5``; ``window``
    (a sliding-window layer's) hides the keys ``window`` or more places before a query; ``softcap``
    caps the logits as ``softcap · tanh(logits / softcap)`` before the bias is added.
    """
    if backend not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {list(BACKENDS)}")
    _check_shapes(query, key, value, bias)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if bias is None:
        bias = key.new_zeros(key.shape[0], 1, key.shape[2], dtype=torch.float32)
    return _IMPLEMENTATIONS[backend](query, key, value, bias, scaling, causal, window, softcap)


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.shape != v.shape[:-1] + (k.shape[-1],) or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"expected q (B,Hq,Q,D) and k/v (B,Hkv,K,D); got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if k.shape[2] < q.shape[2]:
        raise ValueError(f"fewer keys ({k.shape[2]}) than queries ({q.shape[2]})")
    if bias is not None and (bias.dim() != 3 or bias.shape[1] not in (1, k.shape[1]) or bias.shape[2] != k.shape[2]):
        raise ValueError(f"bias must be (B, 1 or {k.shape[1]}, {k.shape[2]}), got {tuple(bias.shape)}")


#: The last causal bias made without a window, per (queries, device): a bottom-right aligned mask for
#: fewer keys is its last columns, so the layers and heads of one forward pass share one (read-only).
_CAUSAL: dict[tuple[int, str], torch.Tensor] = {}
#: Biases up to this many elements are kept (16 MiB in fp32); larger ones are made for each call.
_CAUSAL_KEPT = 1 << 22


def _causal_bias(q_len: int, k_len: int, device: torch.device, window: int | None = None) -> torch.Tensor:
    """``(Q, K)`` float: 0 where key j is visible to query i (j <= K - Q + i, and K - Q + i - j < ``window``
    when given), :data:`MASKED` elsewhere. Read-only: without a window it may be shared."""
    room = k_len + 1024  # the keys grow by a segment at a time
    if window is None and q_len > 1 and q_len * room <= _CAUSAL_KEPT:
        key = (q_len, str(device))
        made = _CAUSAL.get(key)
        if made is None or made.shape[1] < k_len:
            if len(_CAUSAL) >= 4:  # a few query lengths at a time (segments, prompts)
                _CAUSAL.clear()
            made = _CAUSAL[key] = _make_causal_bias(q_len, room, device)
        return made[:, made.shape[1] - k_len :]
    return _make_causal_bias(q_len, k_len, device, window)


def _make_causal_bias(q_len: int, k_len: int, device: torch.device, window: int | None = None) -> torch.Tensor:
    rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    cols = torch.arange(k_len, device=device)[None, :]
    visible = cols <= rows
    if window is not None:
        visible = visible & (rows - cols < window)
    return torch.where(visible, 0.0, MASKED)


def _masks_keys(q_len: int, k_len: int, causal: bool, window: int | None) -> bool:
    """Whether the causal or window part hides any key (a single query is the last key: causally it
    sees every key; a window hides keys only past its width)."""
    return (causal and q_len > 1) or (window is not None and k_len > window)


def _logit_bias(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, causal: bool, window: int | None = None):
    """Dense additive mask ``(B, 1 | Hq, Q, K)``: key bias per query head plus the causal (and window) part."""
    groups = q.shape[1] // k.shape[1]
    per_head = bias if bias.shape[1] == 1 else bias.repeat_interleave(groups, dim=1)
    dense = per_head[:, :, None, :].float()
    if _masks_keys(q.shape[2], k.shape[2], causal, window):
        dense = dense + _causal_bias(q.shape[2], k.shape[2], q.device, window)
    return dense


def _eager(q, k, v, bias, scaling, causal, window=None, softcap=None):
    dense_bias = _logit_bias(q, k, bias, causal, window)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    logits = torch.matmul(q, k.transpose(-1, -2)).float() * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    weights = torch.softmax(logits + dense_bias, dim=-1).to(v.dtype)
    return torch.matmul(weights, v)


def _sdpa(q, k, v, bias, scaling, causal, window=None, softcap=None):
    if softcap is not None:  # SDPA has no logit cap: the reference computes it
        return _eager(q, k, v, bias, scaling, causal, window, softcap)
    mask = _logit_bias(q, k, bias, causal, window).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])


def _flex(q, k, v, bias, scaling, causal, window=None, softcap=None):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:  # torch < 2.5
        raise RuntimeError("the flex backend needs torch >= 2.5; use backend='sdpa'") from err
    groups = q.shape[1] // k.shape[1]
    per_kv_head = bias.shape[1] > 1
    offset = k.shape[2] - q.shape[2]
    table = bias.float()

    def add_bias(score, b, h, q_idx, kv_idx):
        head = h // groups if per_kv_head else 0
        if softcap is not None:
            score = torch.tanh(score / softcap) * softcap
        return score + table[b, head, kv_idx]

    block_mask = None
    if causal and window is not None:

        def visible(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx + offset) & (q_idx + offset - kv_idx < window)

    elif causal:

        def visible(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

    if causal:
        block_mask = create_block_mask(visible, None, None, q.shape[2], k.shape[2], device=q.device)
    if q.is_cuda:
        return _compiled_flex()(
            q, k, v, score_mod=add_bias, block_mask=block_mask, scale=scaling, enable_gqa=groups > 1
        )
    with warnings.catch_warnings():  # uncompiled flex on CPU: a slow reference path, warned about by torch
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, score_mod=add_bias, block_mask=block_mask, scale=scaling, enable_gqa=groups > 1)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def extra_column_attention(q, k, v, bias, scaling, causal, kernel: Kernel, window: int | None = None) -> torch.Tensor:
    """The flash-attention trick: carry the bias in one extra head-dim column.

    ``q' = [q, 1]``, ``k' = [k, b / scaling]``, ``v' = [v, 0]``, zero-padded to a multiple of 8, so
    ``q'·k' · scaling = q·k · scaling + b``. ``kernel(q', k', v', causal=, scale=)`` is any attention
    kernel without bias (flash-attn on GPU; :func:`sdpa_kernel` on CPU in tests), given ``window`` when
    the layer slides; output is sliced.
    """
    head_dim = q.shape[-1]
    padded = -(-(head_dim + 1) // 8) * 8
    batch, kv_heads, k_len, _ = k.shape
    column = (bias.float().clamp(min=_FLASH_BIAS_FLOOR) / scaling).to(k.dtype)
    column = column.expand(batch, kv_heads, k_len)[..., None]
    extra = padded - head_dim - 1
    q2 = torch.cat([q, q.new_ones(*q.shape[:3], 1), q.new_zeros(*q.shape[:3], extra)], dim=-1)
    k2 = torch.cat([k, column, k.new_zeros(batch, kv_heads, k_len, extra)], dim=-1)
    v2 = torch.cat([v, v.new_zeros(batch, kv_heads, k_len, padded - head_dim)], dim=-1)
    extra_args = {} if window is None else {"window": window}
    return kernel(q2, k2, v2, causal=causal, scale=scaling, **extra_args)[..., :head_dim]


def sdpa_kernel(q, k, v, *, causal: bool, scale: float, window: int | None = None) -> torch.Tensor:
    """Bias-free attention with bottom-right causal alignment (what flash-attn computes), via SDPA."""
    masked = causal or window is not None
    mask = _causal_bias(q.shape[2], k.shape[2], q.device, window).to(q.dtype) if masked else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def flash_attn_kernel(q, k, v, *, causal: bool, scale: float, window: int | None = None) -> torch.Tensor:
    """flash-attn 2's ``flash_attn_func`` on ``(B, H, S, D)`` tensors (CUDA, fp16/bf16)."""
    try:
        from flash_attn import flash_attn_func
    except ImportError as err:
        raise RuntimeError(
            "the flash_attn backend needs the flash-attn package and a CUDA GPU "
            "(pip install flash-attn --no-build-isolation); use backend='sdpa' or 'flex' instead"
        ) from err
    if not q.is_cuda:
        raise RuntimeError("the flash_attn backend runs on CUDA tensors only; use backend='sdpa' on CPU")
    sides = (-1, -1) if window is None else (window - 1, 0)  # flash-attn's (left, right) reach; -1: unbounded
    out = flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=causal, window_size=sides
    )
    return out.transpose(1, 2)


def _flash(q, k, v, bias, scaling, causal, window=None, softcap=None):
    if softcap is not None:
        raise ValueError(
            "the flash_attn backend carries the nugget bias in an extra head dimension, which a logit softcap "
            "would distort; use backend='sdpa', 'eager' or 'flex' for models with attention softcapping"
        )
    return extra_column_attention(q, k, v, bias, scaling, causal, kernel=flash_attn_kernel, window=window)


_IMPLEMENTATIONS = {"eager": _eager, "sdpa": _sdpa, "flex": _flex, "flash_attn": _flash}


def implementation_name(backend: str) -> str:
    """The ``attn_implementation`` name under which ``backend`` is registered in transformers."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {list(BACKENDS)}")
    return f"nugget2d_{backend}"


#: Up to this many queries (decoding), heads are read where their entries lie on CPU, not joined for the
#: backend's kernel: joining copies the head's whole K/V for one query. A packed layer's heads are read into
#: one padded logits block (:func:`packed_decode_attention`), a head given in parts alone by
#: :func:`parts_attention`. Measured on this project's 2-core CPU, one thread, one head of 3,300 + 60 entries
#: and 3 query heads: join + SDPA 243 us, the parts read in place 159 us (SDPA over K/V already joined: 193 us).
PARTS_QUERIES = 4

Parts = torch.Tensor | tuple[torch.Tensor, ...]


def parts_logits(
    query: torch.Tensor,
    keys: Sequence[torch.Tensor],
    bias: Sequence[torch.Tensor],
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal logits ``q kᵀ · scaling + bias`` (fp32, ``(..., Q, n)``) of one KV head's queries ``(..., Q, D)``
    over keys held in parts (``keys[i]`` ``(n_i, D)``, in order; the queries are the last ``Q`` keys), read
    in place: the logits of every part are joined, never the keys; :data:`MASKED` where a query may not look."""
    parts = [torch.matmul(query, part.transpose(0, 1).to(query.dtype)).float() for part in keys]
    logits = torch.cat(parts, dim=-1) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits + torch.cat(list(bias)).float()
    if query.shape[-2] > 1:
        logits = logits + _causal_bias(query.shape[-2], logits.shape[-1], query.device)
    return logits


def parts_attention(
    query: torch.Tensor,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    bias: Sequence[torch.Tensor],
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal ``softmax(q kᵀ · scaling + bias) v`` of one KV head's queries ``(Hg, Q, D)`` over keys held in
    parts (:func:`parts_logits`), read in place. Equals :func:`biased_attention` over the joined keys."""
    weights = torch.softmax(parts_logits(query, keys, bias, scaling, softcap), dim=-1).to(values[0].dtype)
    out, start = None, 0
    for part in values:
        read = torch.matmul(weights[..., start : start + part.shape[0]], part)
        out, start = read if out is None else out + read, start + part.shape[0]
    return out


def packed_decode_attention(query: torch.Tensor, layer, *, scaling: float | None = None) -> torch.Tensor:
    """Attention of a few queries ``(B, Hq, Q, D)`` (decoding, float32) over a packed ``layer``, equal to
    :func:`per_head_attention` over its heads, in a dozen calls per row instead of a dozen per head: one
    logits block per row, padded to its longest head (masked past each head's end), into which each head's
    packed slots are read where they lie (one matmul each) and the entries appended since in one batched
    matmul; one softmax; the values read back the same way. Measured on this project's 2-core CPU, one
    thread, three heads of 600/800/1,000 + 64 entries and nine query heads: 283 us head by head, 165 us so."""
    batch, query_heads, length, dim = query.shape
    kv_heads = layer.kv_heads
    groups, scaling = query_heads // kv_heads, dim**-0.5 if scaling is None else scaling
    rows = []
    for row in range(batch):
        heads, slot_bias, (tail_keys, tail_values, tail_bias) = layer.packed_row(row)
        longest, tail = slot_bias.shape[-1], tail_keys.shape[1]
        own = query[row].reshape(kv_heads, groups * length, dim)  # rows: (query head in the group, query)
        shape = (kv_heads, groups * length)
        logits = torch.cat([slot_bias.expand(*shape, longest), tail_bias[:, None].expand(*shape, tail)], dim=-1)
        if length > 1:
            logits[:, :, longest:] += _causal_bias(length, tail, query.device).repeat(groups, 1)
        for head, (keys_t, _, n) in enumerate(heads):
            logits[head, :, :n].addmm_(own[head], keys_t, alpha=scaling)
        logits[:, :, longest:].baddbmm_(own, tail_keys.transpose(1, 2), alpha=scaling)
        weights = torch.softmax(logits, dim=-1)
        out = torch.bmm(weights[:, :, longest:], tail_values)
        for head, (_, values, n) in enumerate(heads):
            out[head].addmm_(weights[head, :, :n], values)
        rows.append(out.view(1, query_heads, length, dim))
    return rows[0] if batch == 1 else torch.cat(rows)


def reads_in_place(query: torch.Tensor, backend: str) -> bool:
    """Whether ``query`` is few enough queries, on CPU with a CPU backend, for heads to be read in place."""
    return query.shape[2] <= PARTS_QUERIES and not query.is_cuda and backend in ("eager", "sdpa")


def per_head_attention(
    query: torch.Tensor,
    heads: Sequence[Sequence[tuple[Parts, Parts, Parts]]],
    *,
    scaling: float | None = None,
    backend: str = "sdpa",
    softcap: float | None = None,
) -> torch.Tensor:
    """:func:`biased_attention` where each row and KV head reads its own keys, as many as it has:
    ``heads[b][h]`` is ``(keys (n, D), values (n, D), bias (n,))``, each a tensor or a tuple of its parts
    in order, and ``query`` ``(B, Hq, Q, D)`` (its queries are the last ``Q`` keys of every head). Equals
    padding every head to the longest with masked keys, without reading the padding. Parts are joined
    for the backend's kernel, or read in place (:func:`parts_attention`) by a few queries on CPU.
    Hand-rolled: no CPU kernel takes ragged heads."""
    if backend not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {list(BACKENDS)}")
    kernel, groups = _IMPLEMENTATIONS[backend], query.shape[1] // len(heads[0])
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    in_place = reads_in_place(query, backend)
    rows = []
    for row, per_head in enumerate(heads):
        outs = []
        for head, entry in enumerate(per_head):
            own = query[row : row + 1, head * groups : (head + 1) * groups]
            if isinstance(entry[0], tuple) and in_place:
                outs.append(parts_attention(own[0], *entry, scaling, softcap)[None])
                continue
            keys, values, bias = (torch.cat(part) if isinstance(part, tuple) else part for part in entry)
            keys, values, bias = keys[None, None], values[None, None], bias[None, None]
            outs.append(kernel(own, keys, values, bias, scaling, True, None, softcap))
        rows.append(torch.cat(outs, dim=1))
    return torch.cat(rows, dim=0)


#: How each backend reads a packed layer, whose KV heads hold different numbers of entries: ``loop`` (one
#: kernel call per head over its own entries, :func:`per_head_attention`), ``buckets`` (heads grouped by
#: length, one call per group over its heads padded to the group's longest with masked slots,
#: :func:`bucketed_attention`; one call per layer when the lengths are close or :data:`CALL_COST` is inf)
#: or ``whole`` (the layer rebuilt with every masked slot). Measured on the shipped cache (2-core CPU, one
#: thread, ``benchmarks/heads/batched/``): buckets and one padded call per layer took 6-8 % longer per token
#: than the loop with sdpa and eager at 8k, 16-36 % at 16k, 35-73 % at 32k, whole 26-139 % (busiest head 1.4-1.6x its
#: layer's mean: padding copies more than two saved calls cost), at 2k within -1.3..+2.3 % of it (noise);
#: so the CPU backends keep the loop, and decode a packed layer in one padded logits block per row
#: (:func:`packed_decode_attention`, no K/V copied). flex
#: reads one padded block per layer (it read the layer whole before; compiled flex recompiles for every
#: new shape either way).
HEAD_READS = {"eager": "loop", "sdpa": "loop", "flex": "buckets", "flash_attn": "loop"}
#: What one more kernel call costs in bucketing, as padded slots read per head: heads share a call when
#: padding them to the longest costs less (:func:`head_buckets`).
CALL_COST = {"eager": 1024.0, "sdpa": 1024.0, "flex": float("inf"), "flash_attn": 1024.0}


def head_buckets(lengths: Sequence[int], call_cost: float) -> list[tuple[int, ...]]:
    """KV heads grouped to read together: runs of heads sorted by length, chosen so that the slots read
    (each group's heads times its longest) plus ``call_cost`` per group are least. Heads of equal or
    close lengths share one group; ``call_cost`` inf puts every head in one."""
    order = sorted(range(len(lengths)), key=lambda head: lengths[head])
    if call_cost == float("inf"):
        return [tuple(sorted(order))]
    best, cut = [0.0], [0]  # best[i]: least cost of the i shortest heads; cut[i]: where their last group starts
    for end in range(1, len(order) + 1):
        costs = [best[start] + (end - start) * lengths[order[end - 1]] + call_cost for start in range(end)]
        cut.append(min(range(end), key=costs.__getitem__))
        best.append(costs[cut[-1]])
    groups, end = [], len(order)
    while end:
        groups.append(tuple(sorted(order[cut[end] : end])))
        end = cut[end]
    return groups[::-1]


def bucketed_attention(
    query: torch.Tensor,
    layer,
    groups: Sequence[tuple[int, ...]],
    *,
    scaling: float | None = None,
    backend: str = "sdpa",
    softcap: float | None = None,
) -> torch.Tensor:
    """:func:`per_head_attention` over a packed ``layer`` (a :class:`~nugget2d.compress.cache.NuggetLayer`)
    with one kernel call per group of KV heads (:func:`head_buckets`), each over its heads padded to the
    longest with masked slots (``layer.padded_heads``); ``(B, Hq, Q, D)`` like the others."""
    batch, query_heads, length, dim = query.shape
    kv_heads = layer.kv_heads
    groups_of = query.view(batch, kv_heads, query_heads // kv_heads, length, dim)
    if len(groups) == 1 and len(groups[0]) == kv_heads:
        keys, values, bias = layer.padded_heads(groups[0])
        return biased_attention(
            query, keys, values, bias, scaling=scaling, causal=True, backend=backend, softcap=softcap
        )
    out = torch.empty_like(groups_of)
    for heads in groups:
        keys, values, bias = layer.padded_heads(heads)
        picked = list(heads)
        part = groups_of[:, picked].reshape(batch, -1, length, dim)
        read = biased_attention(
            part, keys, values, bias, scaling=scaling, causal=True, backend=backend, softcap=softcap
        )
        out[:, picked] = read.view(batch, len(heads), -1, length, dim)
    return out.view(batch, query_heads, length, dim)


def read_packed(
    query: torch.Tensor, layer, *, scaling: float | None, backend: str, softcap: float | None = None
) -> torch.Tensor:
    """Attention of ``query`` over a packed layer, read as :data:`HEAD_READS` says for ``backend`` (a few
    float32 queries on CPU without a logit cap, decoding: :func:`packed_decode_attention`)."""
    how = HEAD_READS[backend]
    if how == "loop" and softcap is None and query.dtype == torch.float32 and reads_in_place(query, backend):
        return packed_decode_attention(query, layer, scaling=scaling)
    if how == "loop":
        entries = layer.head_entries(joined=False)
        return per_head_attention(query, entries, scaling=scaling, backend=backend, softcap=softcap)
    if how == "buckets":
        groups = head_buckets(layer.head_lengths(), CALL_COST[backend])
        return bucketed_attention(query, layer, groups, scaling=scaling, backend=backend, softcap=softcap)
    return biased_attention(
        query, layer.keys, layer.values, layer.bias, scaling=scaling, causal=True, backend=backend, softcap=softcap
    )


def _interface(backend: str) -> Callable:
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # The nugget cache (passed by Nugget2DModel) holds the bias of every key, new tokens included.
        cache = kwargs.get("nugget_cache")
        window, softcap = kwargs.get("sliding_window"), kwargs.get("softcap")
        bias = cache.attention_bias(module.layer_idx) if cache is not None else None
        layer = cache.layers[module.layer_idx] if cache is not None else None
        # a sliding-window layer's entries are never chosen among: nobody needs to watch its attention
        observer = getattr(cache, "observer", None) if window is None else None
        packed = layer is not None and layer.packed  # then the cache handed over only the entries appended since
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if packed:
            out = read_packed(query, layer, scaling=scaling, backend=backend, softcap=softcap)
            if hasattr(observer, "observe_packed"):  # it reads each head where its entries lie
                observer.observe_packed(module.layer_idx, query, layer, scale)
                observer = None
            elif observer is not None:
                key = layer.keys  # the observer reads every slot
        else:
            out = biased_attention(
                query, key, value, bias, scaling=scaling, causal=True, backend=backend, window=window, softcap=softcap
            )
        if observer is not None:  # e.g. a cache policy that scores keys by the attention they receive
            observer(module.layer_idx, query, key, bias, scale)
        return out.transpose(1, 2).contiguous(), None

    attention.__name__ = f"nugget2d_{backend}_attention"
    return attention


def register_backends() -> None:
    """Register every backend in transformers' ``AttentionInterface`` (idempotent)."""
    for backend in BACKENDS:
        AttentionInterface.register(implementation_name(backend), _interface(backend))


register_backends()
