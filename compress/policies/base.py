"""What a cache policy is: the small interface every policy implements (see ``docs/design.md``).

A session reads text in segments; its last ``recent`` tokens stay raw, and the tokens that leave
that raw window are handed to the policy, which says which of them stay (:meth:`CachePolicy.choose`)
and, when the kept entries outgrow the budget, which of them go (:meth:`CachePolicy.evict`). A
policy may watch the attention while a segment is read (:meth:`CachePolicy.observer`,
:meth:`CachePolicy.after_read`). Storage — gathering, packing, re-rotating, saving — is the cache's
job (:class:`~nugget2d.compress.NuggetCache`), so a policy is a few lines of selection.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..cache import NuggetCache
from ..selection import nugget_count


@dataclass
class Leaving:
    """Entries leaving the raw window: ``indices`` (cache entries of row 0, text order), every entry's
    ``scores`` ``(N,)`` (the scorer's, or what the policy's observer recorded), the ``ratio`` of them
    to keep, the ``cache`` and the ``model`` (a :class:`~nugget2d.compress.Nugget2DModel`)."""

    cache: NuggetCache
    indices: list[int]
    scores: torch.Tensor
    ratio: float
    model: Any

    @property
    def count(self) -> int:
        """How many of them a policy keeping a ``ratio`` share keeps: ``ceil(n·ratio)``."""
        return nugget_count(len(self.indices), self.ratio)


class CachePolicy(ABC):
    """Decides what stays of the text that leaves a session's raw window.

    Class attributes say how the session treats the policy: ``name`` (what ``--policy`` calls it),
    ``reads_with_encoder`` (the encoder adapter writes the cache's K/V, as nugget2d does; otherwise the
    unmodified model's K/V), ``makes_nuggets`` (kept entries carry their score on the attention
    logits), ``keeps_leaving`` (False: nothing leaving stays, so the raw window takes all the room)
    and ``scores_heads`` (the scores differ per layer and KV head, so :class:`PerHeadBudget` can
    spread the budget over them). Subclasses are dataclasses whose fields are the policy's settings.
    """

    name: ClassVar[str] = ""
    reads_with_encoder: ClassVar[bool] = False
    makes_nuggets: ClassVar[bool] = False
    keeps_leaving: ClassVar[bool] = True
    scores_heads: ClassVar[bool] = False
    wants_surprise: ClassVar[bool] = False  # reading records each token's surprise (Nugget2DModel.surprise)

    def observer(self) -> Callable[..., None] | None:
        """What watches the attention while a segment is read (None: nothing)."""
        return None

    def after_read(self, cache: NuggetCache, observer: Callable[..., None] | None, new: int) -> Any:
        """After a segment of ``new`` tokens was read with :meth:`observer` watching: update the cache's
        scores from what it saw; return what the session should keep until the cache next changes."""
        return None

    @abstractmethod
    def choose(self, leaving: Leaving) -> list[int]:
        """Which of ``leaving.indices`` stay (cache indices, text order); every policy must say."""

    def evict(self, kept: list[int], scores: torch.Tensor, remove: int) -> list[int]:
        """``kept`` (cache indices, text order) without ``remove`` of them: by default the lowest-scoring."""
        order = scores[kept].argsort(descending=True)[: len(kept) - remove]
        return sorted(kept[int(i)] for i in order)
