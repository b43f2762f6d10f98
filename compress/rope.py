"""Moving rotated keys to new positions: RoPE rotations compose, R(p + δ) = R(δ) R(p) (docs/design.md).

Exact for the rotary schemes whose frequencies do not depend on the sequence length (default,
linear, llama3, yarn); ``dynamic`` and ``longrope`` re-derive frequencies from the length seen
and are refused. Models whose layers use different rotary embeddings (Gemma 3: a local base for
its sliding-window layers, a global base and scaling for the others) get one rotary per layer
(:func:`layer_rotaries`); a cache given a sequence of them re-rotates each layer with its own.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence

import torch
from torch import nn

POSITION_DEPENDENT = ("dynamic", "longrope")

#: One rotary for every layer, or one per layer (indexed by layer).
Rotary = nn.Module | Sequence[nn.Module]


class LayerRotary:
    """One layer type's view of a rotary module keyed by layer type (transformers 5's Gemma 3 style,
    ``rotary(x, position_ids, layer_type)``): called as ``(x, position_ids)`` like a plain one, with its
    ``rope_type`` and ``attention_scaling``."""

    def __init__(self, rotary: nn.Module, layer_type: str) -> None:
        self.rotary, self.layer_type = rotary, layer_type
        kinds = getattr(rotary, "rope_type", None)
        self.rope_type = kinds.get(layer_type, "default") if isinstance(kinds, dict) else "default"
        self.attention_scaling = getattr(rotary, f"{layer_type}_attention_scaling", 1.0)

    def __call__(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(x, position_ids, self.layer_type)

    def __repr__(self) -> str:
        return f"LayerRotary({type(self.rotary).__name__}, {self.layer_type!r})"


def layer_rotaries(body: nn.Module, layer_types: Sequence[str] | None, num_layers: int) -> list:
    """The rotary embedding each of ``num_layers`` layers of a decoder ``body`` applies: its one
    ``rotary_emb``, or per layer type (a rotary taking ``layer_type``; or Gemma 3's older
    ``rotary_emb_local`` for sliding-window layers)."""
    rotary = body.rotary_emb
    keyed = "layer_type" in inspect.signature(rotary.forward).parameters
    if keyed and layer_types:
        views = {kind: LayerRotary(rotary, kind) for kind in set(layer_types)}
        return [views[kind] for kind in layer_types]
    local = getattr(body, "rotary_emb_local", None)
    if local is not None and layer_types:
        return [local if kind == "sliding_attention" else rotary for kind in layer_types]
    return [rotary] * num_layers


def layer_rotary(rotary: Rotary, index: int) -> nn.Module:
    """Layer ``index``'s rotary of ``rotary`` (one for all layers, or a sequence of one per layer)."""
    return rotary[index] if isinstance(rotary, Sequence) else rotary


def rope_type(rotary_emb: nn.Module) -> str:
    """The rotary scheme name of a transformers rotary embedding module."""
    kind = getattr(rotary_emb, "rope_type", "default")
    return kind if isinstance(kind, str) else "default"


def check_rerotatable(rotary_emb: Rotary) -> None:
    """Raise ``ValueError`` for rotary schemes whose keys cannot be moved exactly (any layer's)."""
    for rotary in rotary_emb if isinstance(rotary_emb, Sequence) else [rotary_emb]:
        kind = rope_type(rotary)
        if kind in POSITION_DEPENDENT:
            raise ValueError(
                f"rotary scaling '{kind}' changes its frequencies with the sequence length, so cached keys cannot "
                "be moved to new positions exactly; use positions='original' (texts inside the native window) or "
                "a model with default, linear, llama3 or yarn rotary scaling"
            )


#: Per rotary module, cos and sin of every whole-number shift in ``[-reach, reach]`` (halves of the head
#: dimension: HF rotaries repeat their angles in both halves): re-rotating a cache looks angles up instead of
#: computing them (the trigonometry was ~6 % of streaming reading at 60k tokens, the lookup a copy).
_ANGLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _angle_table(rotary_emb, reach: int, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(cos, sin)`` ``(2R + 1, dim / 2)`` of the shifts ``-R … R`` (``R >= reach``) for ``rotary_emb``, made
    by the module itself, divided by its attention scaling; None when its angles differ between the halves."""
    have = _ANGLES.get(rotary_emb)
    if have is not None and have[0] >= reach and have[1] is not None and have[1].device == device:
        return have[1], have[2]
    if have is not None and have[1] is None:
        return None
    size = max(1024, 1 << (max(reach, 1) - 1).bit_length())
    shifts = torch.arange(-size, size + 1, device=device)[None]
    scale = float(getattr(rotary_emb, "attention_scaling", 1.0) or 1.0)
    with torch.inference_mode(False), torch.no_grad():  # a plain constant, usable in any later mode
        cos, sin = rotary_emb(torch.zeros(1, device=device), position_ids=shifts)
    cos, sin, half = cos[0].float() / scale, sin[0].float() / scale, dim // 2
    if cos.shape[-1] != dim or not (
        torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])
    ):
        _ANGLES[rotary_emb] = (size, None, None)
        return None
    _ANGLES[rotary_emb] = (size, cos[:, :half].contiguous(), sin[:, :half].contiguous())
    return _ANGLES[rotary_emb][1:]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rerotate(keys: torch.Tensor, delta: torch.Tensor, rotary_emb: nn.Module) -> torch.Tensor:
    """Keys ``(B, H, N, D)`` rotated at positions ``p`` → the same keys rotated at ``p + delta``.

    ``delta`` is ``(B, N)``, or ``(B, H, N)`` for a shift per head (any sign). Uses the layer's own
    rotary module for the angles, divided by its attention scaling (yarn multiplies cos/sin by it; a
    relative rotation must not).
    """
    check_rerotatable(rotary_emb)
    delta = delta.to(keys.device)
    shifts = delta[:, None, :] if delta.dim() == 2 else delta
    return rotate_rows(keys, shifts.expand(keys.shape[:3]), rotary_emb)


def rotate_rows(keys: torch.Tensor, delta: torch.Tensor, rotary_emb: nn.Module) -> torch.Tensor:
    """Keys ``(..., D)`` each moved by its whole-number shift ``delta`` ``(...)`` (same leading shape): the
    rotation :func:`rerotate` applies, for keys in any layout (a packed layer's pairs in use)."""
    if keys.numel() == 0:
        return keys.float().to(keys.dtype)
    reach = int(delta.abs().max())
    table = _angle_table(rotary_emb, reach, keys.shape[-1], keys.device)
    if table is None:  # angles not repeated in both halves: computed by the module for these shifts
        scale = float(getattr(rotary_emb, "attention_scaling", 1.0) or 1.0)
        cos, sin = rotary_emb(keys.float(), position_ids=delta.reshape(1, -1))
        cos, sin = (cos / scale).view(*delta.shape, -1), (sin / scale).view(*delta.shape, -1)
        return (keys.float() * cos + _rotate_half(keys.float()) * sin).to(keys.dtype)
    index = (delta.reshape(-1) + (table[0].shape[0] // 2)).long()
    cos = table[0].index_select(0, index).view(*delta.shape, -1)
    sin = table[1].index_select(0, index).view(*delta.shape, -1)
    first, second = keys.float().chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1).to(keys.dtype)
