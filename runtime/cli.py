"""The ``nugget2d`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from nugget2d.compress import Nugget2DConfig


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="local HF model directory (default: embedded SmolLM2-135M)")
    parser.add_argument("--adapter", default=None, help="Nugget2D adapter directory, or 'none'")


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.context, args.ratio, args.max_new_tokens, args.model, args.adapter)
    return 0


def _compress(args: argparse.Namespace) -> int:
    import torch

    from .loading import load_nugget2d
    from .texts import read_text_file

    text = read_text_file(args.input)
    model, tokenizer = load_nugget2d(args.model, args.adapter, Nugget2DConfig(ratio=args.ratio))
    ids = tokenizer(text, return_tensors="pt").input_ids
    window = model.base.config.max_position_embeddings
    if ids.shape[1] > window:
        raise ValueError(
            f"{args.input} has {ids.shape[1]} tokens, more than the model's native window ({window}); "
            "compress a shorter text (streaming over longer ones is `nugget2d generate`)"
        )
    with torch.no_grad():
        cache = model.compress(ids, ratio=args.ratio).detach()
    cache.save(args.output)
    full_bytes = model.compress(ids[:, :1], ratio=1.0).kv_nbytes() * ids.shape[1]
    stats = {
        "tokens": ids.shape[1],
        "cache_tokens": int(cache.entry_counts()[0]),
        "cache_bytes": cache.nbytes,
        "full_kv_bytes": full_bytes,
        "output": str(args.output),
    }
    print(json.dumps(stats, indent=2))
    return 0


_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def _demo_parser(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    parser.add_argument("--context", type=int, default=1024, help="tokens of the bundled book to compress")
    parser.add_argument("--ratio", type=float, default=0.1, help="fraction of tokens kept as nuggets")
    parser.add_argument("--max-new-tokens", type=int, default=40)


def _compress_parser(parser: argparse.ArgumentParser) -> None:
    _add_model_arguments(parser)
    parser.add_argument("--input", required=True, help="UTF-8 text file (within the model's native window)")
    parser.add_argument("--output", required=True, help="where to write the nugget cache (.safetensors)")
    parser.add_argument("--ratio", type=float, default=0.1, help="fraction of tokens kept as nuggets")


_COMMANDS["demo"] = ("compress a bundled passage and continue it over the nuggets", _demo_parser, _demo)
_COMMANDS["compress"] = ("compress a text file into a nugget cache file", _compress_parser, _compress)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="nugget2d", description="Nugget2D long-context runtime")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, configure, _) in _COMMANDS.items():
        configure(sub.add_parser(name, help=summary, description=summary))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; user errors print one line and exit with status 2."""
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command][2](args)
    except (ValueError, FileNotFoundError) as err:
        print(f"nugget2d {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nugget2d {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
