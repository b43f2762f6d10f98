"""Moving rotated keys to new positions: RoPE rotations compose, R(p + δ) = R(δ) R(p) (docs/design.md).

Exact for the rotary schemes whose frequencies do not depend on the sequence length (default,
linear, llama3, yarn); ``dynamic`` and ``longrope`` re-derive frequencies from the length seen
and are refused.
"""

from __future__ import annotations

import torch
from torch import nn

POSITION_DEPENDENT = ("dynamic", "longrope")


def rope_type(rotary_emb: nn.Module) -> str:
    """The rotary scheme name of a transformers rotary embedding module."""
    kind = getattr(rotary_emb, "rope_type", "default")
    return kind if isinstance(kind, str) else "default"


def check_rerotatable(rotary_emb: nn.Module) -> None:
    """Raise ``ValueError`` for rotary schemes whose keys cannot be moved exactly."""
    kind = rope_type(rotary_emb)
    if kind in POSITION_DEPENDENT:
        raise ValueError(
            f"rotary scaling '{kind}' changes its frequencies with the sequence length, so cached keys cannot be "
            "moved to new positions exactly; use positions='original' (texts inside the native window) or a model "
            "with default, linear, llama3 or yarn rotary scaling"
        )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rerotate(keys: torch.Tensor, delta: torch.Tensor, rotary_emb: nn.Module) -> torch.Tensor:
    """Keys ``(B, H, N, D)`` rotated at positions ``p`` → the same keys rotated at ``p + delta``.

    ``delta`` is ``(B, N)``, or ``(B, H, N)`` for a shift per head (any sign). Uses the model's own
    rotary module for the angles, divided by its attention scaling (yarn multiplies cos/sin by it; a
    relative rotation must not).
    """
    check_rerotatable(rotary_emb)
    delta = delta.to(keys.device)
    scale = float(getattr(rotary_emb, "attention_scaling", 1.0) or 1.0)
    cos, sin = rotary_emb(keys.float(), position_ids=delta.flatten(0, -2))
    if delta.dim() == 3:
        cos, sin = cos.unflatten(0, delta.shape[:2]) / scale, sin.unflatten(0, delta.shape[:2]) / scale
    else:
        cos, sin = (cos / scale)[:, None], (sin / scale)[:, None]
    moved = keys.float() * cos + _rotate_half(keys.float()) * sin
    return moved.to(keys.dtype)
