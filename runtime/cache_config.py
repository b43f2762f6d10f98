"""One cache configuration — the shape of a session's cache and the policy that fills it — validated once.

:class:`CacheConfig` is what the CLI (its flags are generated from the fields), sessions, batch
jobs, the server and the benchmarks share. ``ratio`` left unset takes the adapter's.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import typing
from dataclasses import dataclass, field
from typing import Any

from nugget2d.compress import Nugget2DModel
from nugget2d.compress.config import check_ratio
from nugget2d.compress.policies import CachePolicy, PerHeadBudget, check_policy, is_kvpress, make_policy
from nugget2d.compress.policies.registry import policy_class

#: How a session numbers its cache (:attr:`CacheConfig.positions`).
POSITIONS = ("auto", "cache", "original")
ALLOCATIONS = ("auto", "token", "head")
#: Where look-back's spans are read (:attr:`CacheConfig.lookback_placement`, :mod:`nugget2d.runtime.lookback`).
PLACEMENTS = ("auto", "text", "after", "alone")
#: Fields that shape answers, not what a session reads: a saved session may be asked with others.
ANSWER_FIELDS = ("lookback", "lookback_placement")
OVERFLOWS = ("evict", "recompress")
_log = logging.getLogger("nugget2d")


def _flag(help: str, choices: tuple[str, ...] | None = None) -> dict[str, Any]:
    return {"metadata": {"help": help, "choices": choices}}


@dataclass
class CacheConfig:
    """The cache's shape and policy; every field is also a CLI flag (``--read-budget`` for ``read_budget``).

    A session holds at most ``budget`` entries: the first ``sinks`` tokens and the last ``recent`` raw,
    the rest kept by ``policy`` from the text that left the raw window (:mod:`nugget2d.compress.policies`),
    ``ratio`` of it (unset: the adapter's). Text is read ``segment`` tokens at a time; while reading the
    cache may hold ``read_budget`` entries (a text that fits is read with full attention and compressed
    into ``budget`` when asked). ``allocation`` spreads the kept entries per token (every layer and head
    keeps the same) or per (layer, KV head) (``auto``: per head when the adapter's scorer scores heads);
    in a per-head cache the attention of each read segment's last ``observation_window`` queries votes
    beside the scorer. ``positions``: numbered by cache entry (any length), by text position (texts inside
    the model's window), or ``auto`` (text positions for per-head caches until the text outgrows the
    window). ``overflow``: when kept entries outgrow the budget, evict the lowest-scoring or re-select
    the oldest at the ratio. ``lookback``: tokens of the text read raw again for each question, chosen
    for it and dropped after (:mod:`nugget2d.runtime.lookback`; 0 = off), read where
    ``lookback_placement`` says (``auto``: after the cache while it is numbered by text position, alone
    with the text's opening past the window)."""

    ratio: float | None = field(
        default=None, **_flag("fraction of the text leaving the raw window that is kept (default: the adapter's)")
    )
    budget: int = field(default=2048, **_flag("cache entries in all (sinks + kept + recent)"))
    recent: int = field(default=512, **_flag("last tokens kept raw"))
    segment: int = field(default=256, **_flag("tokens read per step"))
    sinks: int = field(default=4, **_flag("first tokens kept raw (attention sinks)"))
    overflow: str = field(
        default="evict",
        **_flag("when kept entries outgrow the budget: drop the lowest-scoring, or re-select the oldest", OVERFLOWS),
    )
    positions: str = field(
        default="auto",
        **_flag(
            "positions inside the cache (any length), text positions (texts "
            "inside the window), or auto: text positions for per-head caches "
            "until the text outgrows the window",
            POSITIONS,
        ),
    )
    policy: str = field(
        default="nugget2d",
        **_flag(
            "what stays of text leaving the raw window: a registered policy "
            "(full, nugget2d, streaming, snapkv, compressive) or module:Class"
        ),
    )
    allocation: str = field(
        default="auto",
        **_flag(
            "kept entries per token, or spread over (layer, KV head) by a "
            "per-head scorer (auto: head when the adapter's scorer scores "
            "heads)",
            ALLOCATIONS,
        ),
    )
    observation_window: int = field(
        default=PerHeadBudget.observation_window,
        **_flag(
            "per-head caches: the attention of each read segment's last "
            "N queries votes beside the scorer (0: the scorer alone)"
        ),
    )
    surprise_votes: bool = field(
        default=False,
        **_flag(
            "per-head caches: each token's surprise where it was read (its negative log-likelihood) votes beside "
            "the scorer and the attention on what stays (~1.2x the reading time)"
        ),
    )
    scorer_first_share: float | None = field(
        default=None,
        **_flag("per-head caches: the entries chosen by score alone first are at most this share of those kept"),
    )
    read_budget: int | None = field(
        default=None, **_flag("entries the cache may hold while reading (default: --budget); memory peaks here")
    )
    lookback: int = field(
        default=0,
        **_flag(
            "tokens of the text read raw again before each answer, chosen for the question, dropped after "
            "(0: off; needs the session's token ids)"
        ),
    )
    lookback_placement: str = field(
        default="auto",
        **_flag(
            "where look-back's spans are read: after the cache, at their text positions, alone with the text's "
            "opening (the cache hidden for that answer), or auto: after while the cache is numbered by text "
            "position, alone past the model's window",
            PLACEMENTS,
        ),
    )

    def __post_init__(self) -> None:
        if self.ratio is not None:
            check_ratio(self.ratio)
        check_policy(self.policy)
        if is_kvpress(self.policy):
            raise ValueError(
                f"{self.policy}: kvpress presses compress a whole prompt at once and are measured by "
                "`nugget2d bench quality --methods kvpress:<Press>`, not run in a session"
            )
        for name in ("budget", "segment"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("recent", "sinks", "observation_window", "lookback"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name, choices in (
            ("overflow", OVERFLOWS),
            ("positions", POSITIONS),
            ("allocation", ALLOCATIONS),
            ("lookback_placement", PLACEMENTS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        if self.allocation == "head" and not self._spreads_per_head():
            raise ValueError(
                "allocation='head' spreads a scorer's per-head scores, evicting the lowest: it needs a policy that "
                f"scores heads (nugget2d; {self.policy!r} does not) and overflow='evict'"
            )
        if self.read_budget is not None and self.read_budget < self.budget:
            raise ValueError(
                f"read_budget ({self.read_budget}) cannot be below budget ({self.budget}): it is what the cache may "
                "hold while reading; raise --read-budget or leave it out"
            )
        floor = self.sinks + self.recent + self.segment
        if self.read_capacity <= floor:
            name = "read_budget" if self.read_capacity > self.budget else "budget"
            raise ValueError(
                f"{name} ({self.read_capacity}) must exceed sinks + recent + segment ({self.sinks} + {self.recent} + "
                f"{self.segment} = {floor}) to leave room for kept entries; raise --budget or lower --recent/--segment"
            )
        if self.budget <= self.sinks + self.recent:
            raise ValueError(
                f"budget ({self.budget}) must exceed sinks + recent ({self.sinks} + {self.recent}) to leave room for "
                "kept entries; raise --budget or lower --recent"
            )

    def _spreads_per_head(self) -> bool:
        """Whether the policy's scores differ per (layer, KV head) and kept entries are evicted (not re-selected)."""
        return policy_class(self.policy).scores_heads and self.overflow == "evict"

    @property
    def read_capacity(self) -> int:
        """Entries the cache may hold while reading: ``read_budget``, never below ``budget``."""
        return max(self.budget, self.read_budget or 0)

    def for_model(self, model: Nugget2DModel) -> CacheConfig:
        """This configuration with what it leaves to the adapter filled in: ``ratio`` (the adapter's when
        unset; a different one is used as asked, with a note) and ``allocation`` (``auto``: ``head`` for a
        per-head scorer under the nugget2d policy with eviction, ``token`` otherwise)."""
        trained = model.config.ratio
        uses_scorer = policy_class(self.policy).reads_with_encoder
        if uses_scorer and self.ratio is not None and self.ratio != trained and model.adapter_source != "untrained":
            _note_ratio(trained, self.ratio)
        allocation = self.allocation
        if allocation == "auto":
            allocation = "head" if model.scorer.heads is not None and self._spreads_per_head() else "token"
        return dataclasses.replace(self, ratio=trained if self.ratio is None else self.ratio, allocation=allocation)

    def make_policy(self) -> CachePolicy | PerHeadBudget:
        """The policy object this configuration names; wrapped in :class:`PerHeadBudget` for a per-head
        cache (``allocation`` resolved by :meth:`for_model`)."""
        policy = make_policy(self.policy)
        if self.allocation == "head":
            return PerHeadBudget(
                policy,
                observation_window=self.observation_window,
                scorer_first_share=self.scorer_first_share,
                surprise_votes=self.surprise_votes,
            )
        return policy


def add_cache_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    title: str = "cache",
    exclude: tuple[str, ...] = (),
    only: tuple[str, ...] | None = None,
) -> argparse._ArgumentGroup:
    """One flag per :class:`CacheConfig` field (``--read-budget`` for ``read_budget``), ``only`` those
    named or all but ``exclude``, in a group the caller may extend (added to ``parser`` itself when it is
    a group already); defaults, choices and help come from the fields."""
    group = parser if isinstance(parser, argparse._ArgumentGroup) else parser.add_argument_group(title)
    hints = typing.get_type_hints(CacheConfig)
    for item in dataclasses.fields(CacheConfig):
        if item.name in exclude or (only is not None and item.name not in only):
            continue
        meta = item.metadata
        flag = "--" + item.name.replace("_", "-")
        if isinstance(item.default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=item.default, help=meta["help"])
            continue
        kind = _value_type(hints[item.name])
        group.add_argument(flag, type=kind, default=item.default, choices=meta["choices"], help=meta["help"])
    return group


def _value_type(hint: Any) -> type:
    """What a flag parses its value as: the field's type, without ``None`` (``float | None`` -> ``float``)."""
    kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
    return kinds[0] if kinds else hint


def cache_config(args: argparse.Namespace, **overrides: Any) -> CacheConfig:
    """The :class:`CacheConfig` of parsed flags (fields without a flag keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(CacheConfig) if hasattr(args, f.name)}
    return CacheConfig(**{**given, **overrides})


@functools.cache
def _note_ratio(trained: float, asked: float) -> None:
    """Say once per process (not per session, nor per benchmark window) that ``asked`` differs from the
    adapter's ratio."""
    _log.warning("note: the adapter was trained at ratio %s; this cache keeps %s as asked", trained, asked)
