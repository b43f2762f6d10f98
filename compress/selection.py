"""Which tokens of a segment become nuggets: top-k by score or a score threshold."""

from __future__ import annotations

import math

import torch

from .config import check_ratio

# Slack for float products such as 30 * 0.1 = 3.0000000000000004, whose ceiling would keep one extra token.
_CEIL_EPS = 1e-9


def nugget_count(num_tokens: int, ratio: float) -> int:
    """``ceil(num_tokens * ratio)``, at least 1 for a non-empty segment."""
    check_ratio(ratio)
    if num_tokens <= 0:
        return 0
    return max(1, math.ceil(num_tokens * ratio - _CEIL_EPS))


def select_topk(
    scores: torch.Tensor, ratio: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``ceil(n * ratio)`` highest-scoring tokens per row (``n`` = real tokens in that row).

    Returns ``(indices, valid)``, both ``(batch, k_max)``: indices in text order, the row's last real
    token always among them; ``valid`` is False on the padding slots of rows that keep fewer.
    Scores are detached: selection itself carries no gradient.
    """
    mask = _as_mask(scores, mask)
    counts = [nugget_count(int(n), ratio) for n in mask.sum(dim=1).tolist()]
    return _select(scores, mask, torch.tensor(counts, device=scores.device))


def select_threshold(
    scores: torch.Tensor, threshold: float, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick every token whose score exceeds ``threshold`` (plus each row's last real token).

    Same return convention as :func:`select_topk`.
    """
    mask = _as_mask(scores, mask)
    forced = _last_real(mask)
    keep = ((scores.detach() > threshold) & mask) | forced
    return _select(scores, mask, keep.sum(dim=1), only=keep)


def _as_mask(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if scores.dim() != 2:
        raise ValueError(f"scores must be (batch, tokens), got shape {tuple(scores.shape)}")
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    mask = mask.to(dtype=torch.bool, device=scores.device)
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every row must contain at least one real token (got an empty row)")
    return mask


def _last_real(mask: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).max(dim=1, keepdim=True).values
    return positions == last


def _select(
    scores: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor, only: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, length = scores.shape
    ranked = scores.detach().float().masked_fill(~mask, float("-inf"))
    if only is not None:
        ranked = ranked.masked_fill(~only, float("-inf"))
    ranked = ranked.masked_fill(_last_real(mask), float("inf"))
    k_max = int(counts.max())
    top = ranked.topk(k_max, dim=1).indices
    slot = torch.arange(k_max, device=scores.device).expand(batch, k_max)
    valid = slot < counts[:, None]
    # Padding slots sort to the end, then read as index 0 (safe to gather, marked invalid).
    ordered = torch.where(valid, top, length).sort(dim=1).values
    valid = ordered < length
    return torch.where(valid, ordered, 0), valid
