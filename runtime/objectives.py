"""The training objectives as modules DeepSpeed can wrap (``forward(**batch) -> loss``):

* :class:`NuggetObjective` — the cache a session would hold for the context, then the reader's
  loss on the target: cross-entropy, KL to the frozen model reading the full raw text (KV-Distill,
  docs/design.md), or both.
* :class:`ScorerObjective` — the scorer alone, fitted by a listwise ranking loss to the frozen
  model's per-(layer, KV head, token) importance (:mod:`.importance`), so one budget can be spent
  across layers and heads on its top entries.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from nugget2d.compress import Nugget2DModel, NuggetCache
from nugget2d.compress.policies import PerHeadBudget

from .importance import Importance, frozen_forward, kv_importance

LOSSES = ("ce", "kl", "ce+kl")
#: ListNet temperature on z-scored log-importance: the loss weighs entries by e^z·φ(z), which peaks
#: at z = 1 (the ~84th percentile), next to the top-10% boundary (z ≈ 1.28) the cache cuts at.
TEMPERATURE = 1.0
#: The share of entries whose recall :func:`topk_recall` reports (a 10x cache keeps about this many).
TOP_FRACTION = 0.1
_FILL = -1e9  # logit of an entry that is not there (padding)


class NuggetObjective(nn.Module):
    """``forward(batch) -> loss`` for a collated batch (see ``train_data.collate``): ``ce`` (the
    targets' cross-entropy), ``kl`` (KL(full-context frozen model ‖ cache reader) on the target
    positions) or ``ce+kl`` (their sum)."""

    def __init__(self, model: Nugget2DModel, loss: str = "ce") -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
        self.model = model
        self.loss = loss

    def forward(self, *args, **batch) -> torch.Tensor:
        """The configured loss of the targets read over the cache of :meth:`cache` (arguments as
        :meth:`losses`)."""
        return self.losses(*args, **batch)["loss"]

    def losses(
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
        label_weights: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"loss"}`` and, when the loss has a KL term, ``{"ce", "kl"}`` too: means over the target
        tokens, or ``label_weights``' weighted means (aligned with ``labels``) when given."""
        cache = self.cache(context, context_mask, sinks, sinks_mask, recent, recent_mask)
        if label_weights is None:
            out = self.model(input_ids, nuggets=cache, attention_mask=input_mask, labels=labels)
            ce = out.loss
        else:
            out = self.model(input_ids, nuggets=cache, attention_mask=input_mask)
            ce = weighted_cross_entropy(out.logits, labels.to(out.logits.device), label_weights)
        if self.loss == "ce":
            return {"loss": ce}
        raw = [(sinks, sinks_mask), (context, context_mask), (recent, recent_mask), (input_ids, input_mask)]
        kl = full_context_kl(self.model, out.logits, raw, labels, label_weights)
        return {"loss": kl if self.loss == "kl" else ce + kl, "ce": ce, "kl": kl}

    @torch.no_grad()
    def measure(self, **batch: torch.Tensor) -> dict[str, float]:
        """The loss (and its parts) of one batch, as floats (held-out evaluation)."""
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        return {name: float(value) for name, value in self.losses(**batch).items()}

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
        (docs/design.md): the recent tokens are read over the whole context, then the context is compressed
        (in a per-head cache with the recent queries' attention voting beside the scorer, as a session's
        default observation does); without sinks and recent, the nuggets alone. With the config's
        ``positions="cache"`` the entries are renumbered after, keys re-rotated, as a session does."""
        cache = None if sinks is None else self.model.encode(sinks, sinks_mask, allow_empty_rows=True)
        if recent is None:
            return self.model.compress(context, context_mask, cache=cache)
        cache = self.model.encode(context, context_mask, cache=cache)
        per_head = PerHeadBudget()  # as a session with the default cache configuration spreads a per-head cache
        observer = per_head.observer() if cache.allocation == "head" else None
        cache = self.model.encode(recent, recent_mask, cache=cache, allow_empty_rows=True, observer=observer)
        observed = per_head.after_read(cache, observer, recent.shape[1])
        return self.model.keep_nuggets(cache, context_mask, tail=recent.shape[1], observed=observed, per_head=per_head)


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``logits`` on ``labels`` (-100: not a target, shifted as the
    model's own loss shifts them), averaged with ``weights`` (aligned with ``labels``)."""
    targets = labels[:, 1:]
    losses = nn.functional.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none"
    ).view_as(targets)
    return _weighted_mean(losses, weights[:, 1:].to(losses.device) * (targets != -100))


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (values * weights).sum() / weights.sum().clamp_min(1e-12)


def full_context_kl(
    model: Nugget2DModel,
    student_logits: torch.Tensor,
    raw: list[tuple[torch.Tensor | None, torch.Tensor | None]],
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over target positions (``labels`` != -100, shifted as for cross-entropy; weighted by
    ``weights``, aligned with ``labels``, when given) of KL(teacher ‖ student): the teacher is the
    frozen model (no LoRA, no grad) reading the raw pieces ``[(ids, mask), ...]`` in order — the last
    one the reader's input, aligned with ``student_logits``."""
    pieces = [(ids, mask) for ids, mask in raw if ids is not None]
    ids = torch.cat([ids for ids, _ in pieces], dim=1).to(model.device)
    mask = torch.cat([mask for _, mask in pieces], dim=1).to(model.device)
    with torch.no_grad():
        teacher = frozen_forward(model, ids, mask, lm_head=True, logits_to_keep=student_logits.shape[1]).logits
    targets = labels[:, 1:].to(model.device) != -100
    log_p = teacher[:, :-1][targets].float().log_softmax(dim=-1)
    log_q = student_logits[:, :-1][targets].float().log_softmax(dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return kl.mean() if weights is None else _weighted_mean(kl, weights[:, 1:].to(kl.device)[targets])


class ScorerObjective(nn.Module):
    """``forward(batch) -> loss``: ListNet between the scorer's scores and the frozen model's
    importance (KVzip repeat + SnapKV window, :func:`~.importance.kv_importance`) over all
    (global layer, KV head, token) entries of each example jointly (a sliding-window layer's are never
    compressed); a token scorer is fitted to the mean importance over those layers and heads. Batches are
    collated scorer examples: ``context`` is the text, ``input_ids`` the repeat instruction and the text
    again. Only the scorer gets gradients."""

    def __init__(self, model: Nugget2DModel, temperature: float = TEMPERATURE) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"the ranking temperature must be > 0, got {temperature}")
        self.model = model
        self.temperature = temperature
        self._heldout: dict[bytes, Importance] = {}  # importance of evaluated batches (it never changes)

    def forward(
        self,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        input_ids: torch.Tensor,
        input_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The ranking loss of one batch (``labels`` are not used)."""
        scores, importance, valid = self.predict(context, context_mask, input_ids, input_mask)
        return listnet_loss(scores, importance, valid, self.temperature)

    def predict(
        self,
        context: torch.Tensor,
        context_mask: torch.Tensor,
        input_ids: torch.Tensor,
        input_mask: torch.Tensor,
        remember: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(scores, importance, valid)``, each ``(B, N)`` over the example's entries (``N`` =
        layers · kv_heads · T for a per-head scorer, ``T`` for a token one); ``remember`` keeps the
        importance of this batch for the next call with the same one."""
        device = self.model.device
        context, context_mask = context.to(device), context_mask.to(device)
        key = _digest(context, context_mask, input_ids, input_mask) if remember else None
        found = self._heldout.get(key) if key is not None else None
        if found is None:
            found = kv_importance(
                self.model,
                context,
                context_mask,
                input_ids.to(device),
                input_mask.to(device),
                features_layer=self.model.config.scorer_layer,
            )
            if key is not None:
                self._heldout[key] = found
        scores = self.model.scorer(found.features)
        valid = context_mask.bool()
        layers = self.model.compressed_layers  # sliding-window layers keep their window: nothing to rank there
        importance = found.scores[:, layers]
        if scores.dim() == 4:  # (B, T, layers, kv_heads) -> (B, layers, kv_heads, T), as the importance
            scores = scores.permute(0, 2, 3, 1)[:, layers]
            valid = valid[:, None, None, :].expand_as(importance)
        else:
            importance = importance.mean(dim=(1, 2))
        return scores.flatten(1), importance.flatten(1), valid.flatten(1)

    @torch.no_grad()
    def measure(self, **batch: torch.Tensor) -> dict[str, float]:
        """Loss, Spearman rank correlation and top-10% recall of one batch, averaged over its examples."""
        scores, importance, valid = self.predict(
            batch["context"], batch["context_mask"], batch["input_ids"], batch["input_mask"], remember=True
        )
        return {
            "loss": float(listnet_loss(scores, importance, valid, self.temperature)),
            "rank_corr": float(rank_correlation(scores, importance, valid).mean()),
            "topk_recall": float(topk_recall(scores, importance, valid).mean()),
        }


def _digest(*tensors: torch.Tensor) -> bytes:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.long).numpy().tobytes())
    return digest.digest()


def standardized_log(importance: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``log(importance)`` z-scored over each row's valid entries ``(B, N)`` (0 elsewhere)."""
    log = importance.float().clamp_min(1e-12).log()
    count = valid.sum(dim=1, keepdim=True).clamp_min(1)
    mean = (log * valid).sum(dim=1, keepdim=True) / count
    spread = (((log - mean) ** 2) * valid).sum(dim=1, keepdim=True) / count
    return ((log - mean) / (spread + 1e-12).sqrt()) * valid


def listnet_loss(
    scores: torch.Tensor, importance: torch.Tensor, valid: torch.Tensor, temperature: float = TEMPERATURE
) -> torch.Tensor:
    """ListNet over each row's valid entries ``(B, N)``, averaged over rows: KL(softmax(z / τ) ‖
    softmax(scores)), ``z`` the z-scored log-importance — the cross-entropy minus the targets'
    entropy (same gradient; 0 when the scores rank and space the entries as the targets do)."""
    valid = valid.bool()
    log_p = (standardized_log(importance, valid) / temperature).masked_fill(~valid, _FILL).log_softmax(dim=1)
    log_q = scores.float().masked_fill(~valid, _FILL).log_softmax(dim=1)
    terms = (log_p.exp() * (log_p - log_q)).masked_fill(~valid, 0.0)
    return terms.sum(dim=1).mean()


def _ranks(values: torch.Tensor) -> torch.Tensor:
    return values.argsort().argsort().float()


def rank_correlation(scores: torch.Tensor, importance: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per row ``(B,)`` between ``scores`` and ``importance`` over the
    row's valid entries; in [-1, 1], 1 when they order the entries alike (0 for fewer than 2)."""
    out = []
    for row in range(scores.shape[0]):
        keep = valid[row].bool()
        if int(keep.sum()) < 2:
            out.append(torch.tensor(0.0))
            continue
        a, b = _ranks(scores[row][keep].float()), _ranks(importance[row][keep].float())
        a, b = a - a.mean(), b - b.mean()
        out.append(((a * b).sum() / ((a * a).sum() * (b * b).sum()).sqrt().clamp_min(1e-12)).cpu())
    return torch.stack(out).clamp(-1.0, 1.0)


def topk_recall(
    scores: torch.Tensor, importance: torch.Tensor, valid: torch.Tensor, fraction: float = TOP_FRACTION
) -> torch.Tensor:
    """Per row ``(B,)``: the share of the ``ceil(fraction · n)`` most important valid entries that
    are also among the ``ceil(fraction · n)`` highest-scoring ones."""
    out = []
    for row in range(scores.shape[0]):
        keep = valid[row].bool()
        count = max(1, math.ceil(fraction * int(keep.sum())))
        best = set(importance[row][keep].float().topk(count).indices.tolist())
        chosen = set(scores[row][keep].float().topk(count).indices.tolist())
        out.append(len(best & chosen) / count)
    return torch.tensor(out)
