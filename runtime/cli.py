"""The ``nugget2d`` command line: one entry point, one subcommand per job.

Each subcommand is a ``configure(parser)`` and a ``run(args) -> exit status`` pair; heavy imports
happen inside ``run`` so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from nugget2d.compress import BACKENDS, Nugget2DConfig


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="local HF model directory (default: embedded SmolLM2-135M)")
    parser.add_argument("--adapter", default=None, help="Nugget2D adapter directory, or 'none'")
    parser.add_argument("--attention", default="sdpa", choices=BACKENDS, help="attention backend")


# --- demo ----------------------------------------------------------------------------------------


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.add_argument("--context", type=int, default=4096, help="tokens of the bundled book to read")
    parser.add_argument("--budget", type=int, default=1024, help="nugget2d cache entries in all")
    parser.add_argument("--ratio", type=float, default=0.1, help="fraction of tokens kept as nuggets")
    parser.add_argument("--max-new-tokens", type=int, default=60)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.context, args.ratio, args.max_new_tokens, args.model, args.adapter, args.budget, args.attention)
    return 0


# --- compress ------------------------------------------------------------------------------------


def _compress_arguments(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.add_argument("--input", required=True, help="UTF-8 text file (within the model's native window)")
    parser.add_argument("--output", required=True, help="where to write the nugget cache (.safetensors)")
    parser.add_argument("--ratio", type=float, default=0.1, help="fraction of tokens kept as nuggets")


def _compress(args: argparse.Namespace) -> int:
    import torch

    from .loading import load_nugget2d
    from .texts import read_text_file

    text = read_text_file(args.input)
    model, tokenizer = load_nugget2d(args.model, args.adapter, Nugget2DConfig(ratio=args.ratio), args.attention)
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
    window = model.base.config.max_position_embeddings
    if ids.shape[1] > window:
        raise ValueError(
            f"{args.input} has {ids.shape[1]} tokens, more than the model's native window ({window}); "
            "compress a shorter text, or stream it with `nugget2d generate`"
        )
    with torch.no_grad():
        cache = model.compress(ids, ratio=args.ratio).detach()
    cache.save(args.output)
    stats = {
        "tokens": ids.shape[1],
        "cache_tokens": int(cache.entry_counts()[0]),
        "cache_bytes": cache.nbytes,
        "full_kv_bytes": model.full_kv_bytes(ids.shape[1]),
        "output": str(args.output),
    }
    print(json.dumps(stats, indent=2))
    return 0


# --- generate ------------------------------------------------------------------------------------


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.add_argument("--input", required=True, help="UTF-8 text file of any length, or - for standard input")
    parser.add_argument("--prompt", required=True, help="the question or instruction about the text")
    cache = parser.add_argument_group("cache")
    cache.add_argument("--ratio", type=float, default=0.1, help="fraction of each segment kept as nuggets")
    cache.add_argument("--budget", type=int, default=2048, help="cache entries in all (sinks + nuggets + recent)")
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
        "--positions",
        choices=["cache", "original"],
        default="cache",
        help="positions inside the cache (any length) or text positions (texts inside the window)",
    )
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=int, default=256)
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    sampling.add_argument("--top-k", type=int, default=0)
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--repetition-penalty", type=float, default=1.0)
    sampling.add_argument("--seed", type=int, default=None)
    sampling.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--no-chat", action="store_true", help="do not wrap text and prompt in the chat template")
    parser.add_argument("--stats-json", type=Path, default=None, help="write sizes, rates and peak memory here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _generate(args: argparse.Namespace) -> int:
    from .generation import GenerationSettings
    from .session import StreamSettings
    from .texts import check_text_file

    stream = StreamSettings(
        args.ratio, args.budget, args.recent, args.segment, args.sinks, args.overflow, args.positions
    )
    sampling = GenerationSettings(
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.repetition_penalty,
        args.seed,
        tuple(args.stop),
    )
    source = _stdin_chunks() if args.input == "-" else check_text_file(args.input)

    from .loading import load_nugget2d
    from .session import StreamingSession

    model, tokenizer = load_nugget2d(args.model, args.adapter, Nugget2DConfig(ratio=args.ratio), args.attention)
    session = StreamingSession(model, tokenizer, stream, chat=not args.no_chat, progress=not args.quiet)
    session.prompt_ids(args.prompt, sampling)  # refuse a prompt that cannot fit before reading the text
    session.ingest(source)
    for piece in session.ask(args.prompt, sampling):
        print(piece, end="", flush=True)
    print()
    stats = session.stats.to_dict()
    if args.stats_json:
        args.stats_json.write_text(json.dumps(stats, indent=2) + "\n")
    print(
        f"[{stats['tokens_ingested']} tokens read at {stats['ingest_tokens_per_s']:.0f} tok/s; cache "
        f"{stats['cache_tokens']} entries, {stats['cache_bytes'] / 2**20:.1f} MiB vs full KV "
        f"{stats['full_kv_bytes'] / 2**20:.1f} MiB; decode {stats['decode_tokens_per_s']:.1f} tok/s; "
        f"peak RSS {stats['peak_rss_bytes'] / 2**30:.2f} GiB]",
        file=sys.stderr,
    )
    return 0


def _stdin_chunks():
    while True:
        chunk = sys.stdin.read(1 << 16)
        if not chunk:
            return
        yield chunk


# --- train ---------------------------------------------------------------------------------------


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from .train import add_arguments

    add_arguments(parser)


def _train(args: argparse.Namespace) -> int:
    from .train import run

    run(args)
    return 0


# --- the parser ----------------------------------------------------------------------------------

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "demo": ("compress a bundled passage and continue it over the nuggets", _demo_arguments, _demo),
    "compress": ("compress a text file into a nugget cache file", _compress_arguments, _compress),
    "generate": (
        "stream a text of any length into a bounded cache and answer a prompt about it",
        _generate_arguments,
        _generate,
    ),
    "train": ("train the compressor (LoRA + scorer) on DeepSpeed, here or on Ray Train", _train_arguments, _train),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="nugget2d", description="Nugget2D long-context runtime")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, configure, _) in COMMANDS.items():
        configure(sub.add_parser(name, help=summary, description=summary))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; user errors print one line and exit with status 2."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"nugget2d {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nugget2d {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
