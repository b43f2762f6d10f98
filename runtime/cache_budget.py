"""Keeping a session's cache inside its budget: what leaves the raw window, what stays, what is evicted.

The part of :class:`~nugget2d.runtime.session.StreamingSession` that moves entries between the cache's
parts — ``[sinks][kept entries][raw window]``, counted by the session's ``sinks``, ``nuggets`` and
``raw`` — asking the session's policy (:mod:`nugget2d.compress.policies`) which entries stay.
"""

from __future__ import annotations

import math

import torch

from nugget2d.compress import nugget_count
from nugget2d.compress.policies import Leaving


class BudgetKeeping:
    """Mixed into a session: makes room for incoming entries by compressing and evicting (needs the
    session's ``settings``, ``policy``, ``cache``, ``model``, ``observed`` and part counters)."""

    def _raw_when_asked(self, needed: int) -> int:
        """Raw entries that stay raw before ``needed`` tokens are fed: the ``recent`` window, fewer if the
        budget is short; the rest of the last segment is compressed, so what a question reads does not
        depend on where the text's last segment ended (at 2k this beat keeping ``recent + segment``
        raw on both bench metrics, ``benchmarks/reading/README.md``)."""
        settings = self.settings
        return min(self.raw, settings.recent, settings.budget - settings.sinks - needed)

    def _make_room(self, incoming: int, keep_raw: int) -> None:
        """Compress raw tokens beyond ``keep_raw`` into nuggets, then shrink the nuggets until
        ``incoming`` more entries fit the budget."""
        keep_raw = max(0, keep_raw)
        scores = self.cache.main_layer.scores
        if scores is None or not self.cache.compressed_layers:
            return  # nothing read yet, or every layer slides (each keeps its window: nothing to compress)
        if not self.policy.keeps_leaving:  # nothing is kept, so the raw window takes all the room
            keep_raw = max(keep_raw, self.settings.budget - self.sinks - incoming)
        if self.allocation == "head":
            self._make_room_per_head(incoming, keep_raw)
            return
        scores = scores[0]
        start = self.sinks + self.nuggets
        leaving = self.raw - keep_raw if self.raw > keep_raw else 0
        keep = list(range(self.sinks))
        nuggets = list(range(self.sinks, start))
        converted = self._choose(list(range(start, start + leaving)), scores) if leaving else []
        raw = list(range(start + leaving, start + self.raw))
        over = len(keep) + len(nuggets) + len(converted) + len(raw) + incoming - self.settings.budget
        all_nuggets = self._shrink(nuggets + converted, scores, max(over, 0))
        if len(all_nuggets) == len(nuggets) and not leaving:
            return  # nothing moves
        index = torch.tensor([keep + all_nuggets + raw], device=self.model.device)
        self.cache.retain(index)
        if self.policy.makes_nuggets:  # the baselines keep plain K/V: no score bias
            self.cache.convert(
                torch.isin(index, torch.tensor(converted, dtype=torch.long, device=index.device)),
                self.model.config.bias_mode,
            )
        if self.cache.position_mode == "cache":
            self.cache.reposition(self.model.rotary_emb)
        self.nuggets, self.raw = len(all_nuggets), len(raw)

    def _make_room_per_head(self, incoming: int, keep_raw: int) -> None:
        """:meth:`_make_room` for a per-head cache: the same token-level budget, but the nuggets' entries
        (old ones and ``ceil(n·r)`` per leaving token block, times layers × KV heads) go to the
        highest-scoring (layer, head, token) triples; the lowest are evicted."""
        leaving = max(self.raw - keep_raw, 0)
        raw = self.raw - leaving
        wanted = self.nuggets + (nugget_count(leaving, self.settings.ratio) if leaving else 0)
        room = self.settings.budget - self.sinks - raw - incoming
        nuggets = max(0, min(wanted, room))
        if nuggets == self.nuggets and not leaving:
            return  # nothing moves
        entries = nuggets * len(self.model.compressed_layers) * self.model.num_kv_heads
        keep = torch.tensor([entries], device=self.model.device)
        observed, self.observed = self.observed, None  # it describes the entries before this change
        renumber = self.cache.position_mode == "cache"
        self.policy.keep(
            self.cache,
            keep,
            None if renumber else self.model.rotary_emb,  # renumbering moves every key once, below
            tail=raw,
            lead=self.sinks,
            bias_mode=self.model.config.bias_mode,
            observed=observed,
        )
        self.cache.nugget_span = torch.tensor([nuggets], device=self.model.device)
        if renumber:
            self.cache.reposition(self.model.rotary_emb)
        self.nuggets, self.raw = nuggets, raw

    def _choose(self, indices: list[int], scores: torch.Tensor) -> list[int]:
        """Which of the consecutive cache entries ``indices`` stay: the policy's choice."""
        return self.policy.choose(Leaving(self.cache, indices, scores, self.settings.ratio, self.model))

    def _shrink(self, nuggets: list[int], scores: torch.Tensor, remove: int) -> list[int]:
        """Drop ``remove`` of the ``nuggets`` (cache indices, text order): as the policy evicts, or by
        choosing among the oldest again at the ratio (``overflow="recompress"``)."""
        remove = min(remove, len(nuggets))
        if remove <= 0:
            return nuggets
        ratio = self.settings.ratio
        if self.settings.overflow == "recompress" and ratio < 1:
            block = min(len(nuggets), math.ceil(remove / (1 - ratio)))
            while block < len(nuggets) and block - nugget_count(block, ratio) < remove:
                block += 1
            if block - nugget_count(block, ratio) >= remove:
                return self._choose(nuggets[:block], scores) + nuggets[block:]
        return self.policy.evict(nuggets, scores, remove)
