"""Flags shared by several commands (model, cache shape, sampling) and the settings they make.

Only argparse and the light compress constants at import time, so ``--help`` stays quick.
"""

from __future__ import annotations

import argparse

from nugget2d.compress import BACKENDS

from .cache_config import add_cache_arguments, cache_config

__all__ = [
    "add_cache_arguments",
    "add_model_arguments",
    "add_sampling_arguments",
    "cache_config",
    "generation_settings",
]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--adapter`` and ``--attention``."""
    parser.add_argument(
        "--model",
        default=None,
        help="local HF model directory, or gemma3-270m (the nugget2d[gemma] extra; default: embedded SmolLM2-135M)",
    )
    parser.add_argument(
        "--adapter",
        default=None,
        help="Nugget2D adapter directory, or 'none' for an untrained one (default: the shipped adapter)",
    )
    parser.add_argument("--attention", default="sdpa", choices=BACKENDS, help="attention backend")


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """``--max-new-tokens --temperature --top-k --top-p --repetition-penalty --no-repeat-ngram --seed --stop
    --stop-at-blank-line``."""
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    sampling.add_argument("--top-k", type=int, default=0)
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--repetition-penalty", type=float, default=1.0)
    sampling.add_argument(
        "--no-repeat-ngram", type=int, default=0, help="never repeat an n-gram of this many tokens (0 = off)"
    )
    sampling.add_argument("--seed", type=int, default=None)
    sampling.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    sampling.add_argument("--stop-at-blank-line", action="store_true", help="end the answer at its first blank line")


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
        tuple(args.stop) + (("\n\n",) if args.stop_at_blank_line else ()),
        no_repeat_ngram=args.no_repeat_ngram,
    )
