"""Flags shared by several commands (model, cache shape, sampling) and the settings they make.

Only argparse and the light compress constants at import time, so ``--help`` stays quick.
"""

from __future__ import annotations

import argparse

from nugget2d.compress import BACKENDS

from .cache_policies import OBSERVATION_WINDOW, POLICIES
from .session import POSITIONS


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--adapter`` and ``--attention``."""
    parser.add_argument("--model", default=None, help="local HF model directory (default: embedded SmolLM2-135M)")
    parser.add_argument(
        "--adapter",
        default=None,
        help="Nugget2D adapter directory, or 'none' for an untrained one (default: the shipped adapter)",
    )
    parser.add_argument("--attention", default="sdpa", choices=BACKENDS, help="attention backend")


def add_cache_arguments(
    parser: argparse.ArgumentParser, title: str = "cache", positions: bool = True
) -> argparse._ArgumentGroup:
    """The cache shape (``--ratio --budget --read-budget --recent --segment --sinks --overflow --policy
    --allocation --observation-window`` and, with ``positions``, ``--positions``) in a group the caller may
    extend."""
    cache = parser.add_argument_group(title)
    cache.add_argument("--ratio", type=float, default=0.1, help="fraction of each segment kept as nuggets")
    cache.add_argument("--budget", type=int, default=2048, help="cache entries in all (sinks + nuggets + recent)")
    cache.add_argument(
        "--read-budget",
        type=int,
        default=None,
        help="entries the cache may hold while reading (default: --budget): a text that fits is read with full "
        "attention and compressed into --budget when asked; memory peaks here",
    )
    cache.add_argument("--recent", type=int, default=512, help="last tokens kept raw")
    cache.add_argument("--segment", type=int, default=256, help="tokens encoded per step")
    cache.add_argument("--sinks", type=int, default=4, help="first tokens kept raw (attention sinks)")
    cache.add_argument(
        "--overflow",
        choices=["evict", "recompress"],
        default="evict",
        help="when nuggets outgrow the budget: drop the lowest-scoring, or re-select the oldest",
    )
    cache.add_argument(
        "--policy",
        choices=POLICIES,
        default="nugget2d",
        help="what stays of text leaving the raw window: nuggets, nothing (StreamingLLM), the most attended "
        "tokens (SnapKV-style) or mean-pooled groups (compressive)",
    )
    cache.add_argument(
        "--allocation",
        choices=["auto", "token", "head"],
        default="auto",
        help="nugget budget per token, or spread over (layer, KV head) by a per-head scorer (auto: head when "
        "the adapter's scorer scores heads)",
    )
    add_observation_window_argument(cache)
    if positions:
        cache.add_argument(
            "--positions",
            choices=POSITIONS,
            default="auto",
            help="positions inside the cache (any length), text positions (texts inside the window), or auto: "
            "text positions for per-head caches until the text outgrows the window, then cache positions",
        )
    return cache


def add_observation_window_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--observation-window`` (:attr:`StreamSettings.observation_window`)."""
    parser.add_argument(
        "--observation-window",
        type=int,
        default=OBSERVATION_WINDOW,
        help="per-head caches: the attention of each read segment's last N queries votes beside the scorer on "
        "what stays (0: the scorer alone)",
    )


def stream_settings(args: argparse.Namespace):
    """The :class:`StreamSettings` of parsed cache flags."""
    from .session import StreamSettings

    return StreamSettings(
        ratio=args.ratio,
        budget=args.budget,
        recent=args.recent,
        segment=args.segment,
        sinks=args.sinks,
        overflow=args.overflow,
        positions=getattr(args, "positions", "auto"),
        policy=args.policy,
        allocation=args.allocation,
        observation_window=args.observation_window,
        read_budget=args.read_budget,
    )


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """``--max-new-tokens --temperature --top-k --top-p --repetition-penalty --seed --stop``."""
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    sampling.add_argument("--top-k", type=int, default=0)
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--repetition-penalty", type=float, default=1.0)
    sampling.add_argument("--seed", type=int, default=None)
    sampling.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def generation_settings(args: argparse.Namespace):
    """The :class:`GenerationSettings` of parsed sampling flags."""
    from .generation import GenerationSettings

    return GenerationSettings(
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.repetition_penalty,
        args.seed,
        tuple(args.stop),
    )
