"""Per-(layer, KV head) budgets: a wrapper that spreads any per-head-scoring policy's budget unevenly.

As kvpress's AdaKV wraps a press, :class:`PerHeadBudget` wraps a policy whose scores differ per
layer and KV head (``scores_heads``; nugget2d's per-head scorer). The entries leaving the raw window,
at every layer and head, compete for one budget of K/V entries; only those kept are stored
(:meth:`~nugget2d.compress.cache_layer.NuggetLayer.pack`), so a budget of ``k`` entries costs the memory
of a token-level cache keeping ``k / (layers · heads)`` tokens.

The rule, in plain words: when the last queries' attention was observed, the ``scorer_first`` tokens'
worth of entries (× layers × heads) with the best scores anywhere are kept first; the rest is split
per layer: an entry's worth is the better of its score's and its attention's percentile among the
candidates; a layer's ``k``-th slot is worth its best head's ``k``-th candidate; the best
``rest / heads`` slots over all layers are opened, and each layer keeps its best (head, entry)
pairs for its opened slots × heads, each head as many as win (at most ``head_cap`` × the layer's
opened slots when set). Without an observation, worth is the score and nothing is kept first; with a
scorer that ranks nothing (every score equal: an untrained, zero-initialised one) the observed attention
alone is the worth, nothing kept first — the training-free setting for models without an adapter.
Measured choices behind the defaults are in ``benchmarks/`` (see ``docs/design.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..cache import NuggetCache
from .base import CachePolicy
from .nugget2d import Nugget2D
from .observers import HeadAttentionReceived


@dataclass
class PerHeadBudget:
    """Spreads ``policy``'s budget over (layer, KV head). ``observation_window``: the last queries of each
    read segment whose attention votes beside the scores (0: the scores alone); ``scorer_first``: tokens'
    worth of entries chosen by score over all layers and heads before the per-layer split (0: none);
    ``head_cap``: a head keeps at most this many times its layer's opened slots (None: no cap);
    ``scorer_first_share``: the entries chosen by score first are at most this share of those kept (None:
    no cap); ``surprise_votes``: each entry's surprise (its token's negative log-likelihood where it was
    read) votes beside score and attention — rare facts such as a planted number are surprising where
    the scorer, fitted on books, ranks them low (``benchmarks/needles/``)."""

    policy: CachePolicy = field(default_factory=Nugget2D)
    observation_window: int = 32
    scorer_first: int = 120
    head_cap: float | None = None
    scorer_first_share: float | None = None
    surprise_votes: bool = False

    def __post_init__(self) -> None:
        if not self.policy.scores_heads:
            raise ValueError(
                f"per-head budgets need scores per (layer, KV head); policy {self.policy.name!r} scores tokens — "
                "use allocation='token', or policy='nugget2d' with a per-head scorer"
            )
        if self.observation_window < 0 or self.scorer_first < 0:
            raise ValueError("observation_window and scorer_first must be >= 0")
        if self.head_cap is not None and self.head_cap <= 0:
            raise ValueError(f"head_cap must be > 0 or None, got {self.head_cap}")
        if self.scorer_first_share is not None and not 0 <= self.scorer_first_share <= 1:
            raise ValueError(f"scorer_first_share must be in [0, 1] or None, got {self.scorer_first_share}")

    @property
    def wants_surprise(self) -> bool:
        """Whether reading must record each token's surprise (:meth:`Nugget2DModel.encode`)."""
        return self.surprise_votes

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def reads_with_encoder(self) -> bool:
        return self.policy.reads_with_encoder

    @property
    def makes_nuggets(self) -> bool:
        return self.policy.makes_nuggets

    @property
    def keeps_leaving(self) -> bool:
        return self.policy.keeps_leaving

    def observer(self) -> HeadAttentionReceived | None:
        """The last ``observation_window`` queries' attention per layer and KV head (None when 0)."""
        return HeadAttentionReceived(self.observation_window) if self.observation_window else None

    def after_read(
        self, cache: NuggetCache, observer: HeadAttentionReceived | None, new: int
    ) -> list[torch.Tensor] | None:
        """The observed attention per global layer ``(B, Hkv, entries)``: kept by the session until the cache
        changes."""
        return None if observer is None else observer.layers(cache.compressed_layers)

    def keep(
        self,
        cache: NuggetCache,
        keep: torch.Tensor,
        rotary_emb: torch.nn.Module | None,
        *,
        tail: int = 0,
        lead: int | None = None,
        pool: int | None = None,
        bias_mode: str = "plain",
        observed: list[torch.Tensor] | None = None,
    ) -> None:
        """Of the candidate entries of every global layer (sliding-window layers keep their window) — after
        the first ``lead`` entries, or the last ``pool`` before the ``tail`` — keep ``keep`` ``(B,)`` K/V
        entries by the rule above (``observed``: per global layer ``(B, Hkv, entries)``, the attention the
        last queries gave each entry), as nuggets in text order per head; the ``tail`` stays as it is. Under
        cache positions a slot's keys are moved to one position with ``rotary_emb``; None leaves each key at
        its own, for a caller that renumbers the cache right after (:meth:`NuggetCache.reposition`)."""
        if cache.allocation != "head":
            raise ValueError("per-head budgets spread entries over heads; this cache is token-level")
        if not cache.compressed_layers:
            return  # every layer slides: nothing to choose among
        bounds, scores = cache.candidates(tail=tail, lead=lead, pool=pool)
        if observed is None:
            picks = self.split_per_layer(scores, keep)
        elif not ranks_entries(scores):  # the training-free setting: the observed attention alone
            picks = self.split_per_layer(observed_worth(cache, bounds, scores, observed, scorer=False), keep)
        else:
            first = torch.full_like(keep, self.scorer_first * len(bounds) * cache.main_layer.kv_heads)
            if self.scorer_first_share is not None:
                first = torch.minimum(first, (keep.float() * self.scorer_first_share).floor().long())
            surprise = surprise_pools(cache, bounds, scores) if self.surprise_votes else None
            worth = observed_worth(cache, bounds, scores, observed, surprise=surprise)
            picks = self.score_first_then_split(scores, worth, keep, first)
        cache.regroup(bounds, picks, bias_mode, rotary_emb if cache.position_mode == "cache" else None)

    def split_per_layer(self, worth: list[torch.Tensor], keep: torch.Tensor) -> list[torch.Tensor]:
        """Which of each layer's candidates ``(B, H, N)`` (worth; -inf = none) stay, ``keep`` ``(B,)`` in all:
        the per-layer split of the rule above."""
        heads = worth[0].shape[1]
        capped = self.head_cap is not None and self.head_cap < heads  # at `heads` a head may take it all
        ranked = [w.sort(dim=2, descending=True, stable=True) for w in worth]  # each head's candidates, best first
        slot_worth = torch.cat([values.amax(dim=1) for values, _ in ranked], dim=1)  # best head's k-th candidate
        opened = best_mask(slot_worth, torch.minimum(keep.to(slot_worth.device) // heads, slot_worth.isfinite().sum(1)))
        picks = []
        for pool, (_, order), slots in zip(worth, ranked, opened.split([w.shape[2] for w in worth], 1)):
            opened_here = slots.sum(dim=1)
            if capped:
                cap = (opened_here.float() * self.head_cap).ceil().long()  # entries one head may keep
                positions = torch.arange(order.shape[2], device=order.device).expand_as(order)
                rank = torch.empty_like(order).scatter_(2, order, positions)  # each candidate's rank in its head
                pool = pool.masked_fill(rank >= cap[:, None, None], float("-inf"))
            pairs = pool.flatten(1)
            share = torch.minimum(opened_here * heads, pairs.isfinite().sum(dim=1))
            picks.append(best_mask(pairs, share).view_as(pool))
        return picks

    def score_first_then_split(
        self, scores: list[torch.Tensor], worth: list[torch.Tensor], keep: torch.Tensor, first: int | torch.Tensor
    ) -> list[torch.Tensor]:
        """``first`` (per row, or one for all) entries by best ``scores`` over all layers and heads (fewer
        when ``keep`` is), then :meth:`split_per_layer` by ``worth`` over the candidates left for the rest."""
        keep = keep.to(scores[0].device)
        chosen = best_anywhere(scores, torch.minimum(keep, torch.as_tensor(first, device=keep.device)))
        left = keep - sum(c.flatten(1).sum(dim=1) for c in chosen)
        rest = self.split_per_layer([w.masked_fill(c, float("-inf")) for w, c in zip(worth, chosen)], left)
        return [c | picked for c, picked in zip(chosen, rest)]


def ranks_entries(scores: list[torch.Tensor]) -> bool:
    """Whether the candidates' finite ``scores`` (per layer ``(B, H, N)``) differ at all (an untrained,
    zero-initialised scorer gives every entry the same)."""
    finite = torch.cat([pool[pool.isfinite()] for pool in scores])
    return finite.numel() > 1 and bool(finite.max() > finite.min())


def observed_worth(
    cache: NuggetCache,
    bounds: list[tuple[int, int]],
    scores: list[torch.Tensor],
    observed: list[torch.Tensor],
    scorer: bool = True,
    surprise: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """The candidates' worth when the last queries' attention was observed: per global layer ``(B, H, N)``,
    the best of the entry's score percentile and attention percentile among all candidates (without
    ``scorer``: the attention percentile alone), and its ``surprise`` percentile when given."""
    global_layers = [cache.layers[index] for index in cache.compressed_layers]
    shapes = [(cache.batch_size, layer.kv_heads, layer.get_seq_length()) for layer in global_layers]
    if [tuple(seen.shape) for seen in observed] != shapes:
        raise ValueError("observed attention must hold one value per (global layer, KV head, entry) of this cache")
    seen = [
        seen[..., start:stop].float().masked_fill(pool.isinf(), float("-inf"))
        for seen, (start, stop), pool in zip(observed, bounds, scores)
    ]
    worth = percentiles(seen)
    if scorer:
        worth = [torch.maximum(a, b) for a, b in zip(percentiles(scores), worth)]
    if surprise is not None:
        worth = [torch.maximum(a, b) for a, b in zip(percentiles(surprise), worth)]
    return worth


def surprise_pools(cache: NuggetCache, bounds: list[tuple[int, int]], scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """The candidates' surprise per global layer ``(B, H, N)`` (-inf where unknown or padding; all -inf
    when the cache recorded none)."""
    pools = []
    for index, (start, stop), pool in zip(cache.compressed_layers, bounds, scores):
        value = cache.layers[index].surprise
        if value is None:
            pools.append(torch.full_like(pool, float("-inf")))
            continue
        value = value if value.dim() == 3 else value[:, None, :].expand(-1, pool.shape[1], -1)
        pools.append(value[..., start:stop].float().masked_fill(pool.isinf(), float("-inf")))
    return pools


def best_anywhere(pools: list[torch.Tensor], count: torch.Tensor) -> list[torch.Tensor]:
    """Masks of each row's ``count`` ``(B,)`` best finite values over all of ``pools`` (per layer
    ``(B, H, N)``; -inf = none), whatever their layer and head (fewer when fewer are finite)."""
    flat = torch.cat([p.flatten(1) for p in pools], dim=1)
    best = best_mask(flat, torch.minimum(count.to(flat.device), flat.isfinite().sum(dim=1)))
    return [part.view_as(p) for part, p in zip(best.split([p[0].numel() for p in pools], 1), pools)]


def best_mask(values: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mask of each row's ``count`` ``(B,)`` largest ``values`` ``(B, N)`` (earlier ones win ties)."""
    order = values.argsort(dim=1, descending=True, stable=True)
    ranks = torch.arange(values.shape[1], device=values.device) < count[:, None]
    return torch.zeros_like(values, dtype=torch.bool).scatter_(1, order, ranks)


def percentiles(pools: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each finite value's rank among all finite values of ``pools`` (each ``(B, H, N)``), as a share
    in (0, 1]; -inf stays -inf."""
    flat = torch.cat([p.flatten(1) for p in pools], dim=1)
    finite = flat.isfinite()
    rank = torch.empty_like(flat).scatter_(
        1,
        flat.argsort(dim=1, stable=True),
        torch.arange(flat.shape[1], device=flat.device, dtype=flat.dtype).expand_as(flat),
    )
    missing = (~finite).sum(dim=1, keepdim=True)
    share = ((rank - missing + 1) / finite.sum(dim=1, keepdim=True).clamp(min=1)).masked_fill(~finite, float("-inf"))
    return [part.view_as(p) for part, p in zip(share.split([p[0].numel() for p in pools], dim=1), pools)]
