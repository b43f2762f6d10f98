"""The ``nugget2d`` command line: one entry point, one subcommand per job.

Each subcommand is a ``configure(parser)`` and a ``run(args) -> exit status`` pair; heavy imports
happen inside ``run`` so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from nugget2d.compress import Nugget2DConfig

from .cli_options import (
    add_cache_arguments,
    add_model_arguments,
    add_sampling_arguments,
    cache_config,
    generation_settings,
)

# --- demo ----------------------------------------------------------------------------------------


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    length = parser.add_mutually_exclusive_group()
    length.add_argument(
        "--context", type=int, default=None, help="tokens of the bundled book to read (default: 4096, a few minutes)"
    )
    length.add_argument("--full-book", action="store_true", help="read the whole book (60k tokens: 15 min or more)")
    parser.add_argument("--budget", type=int, default=2048, help="nugget2d cache entries in all")
    parser.add_argument("--ratio", type=float, default=0.1, help="fraction of tokens kept as nuggets")
    parser.add_argument("--question", action="append", default=None, help="ask this instead (repeatable)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="answer length cap (default: the demo's settings, 60)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: the cores other jobs leave idle, at least 1)"
    )


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .demo import DEMO_TOKENS, QUESTIONS, idle_threads, run_demo

    if args.context is not None and args.context < 1:
        raise SystemExit("--context must be at least 1 token; use --full-book to read the whole book")
    threads = max(1, args.threads) if args.threads is not None else idle_threads()
    torch.set_num_threads(threads)
    print(f"Using {threads} CPU thread{'s' * (threads > 1)} (--threads to change).")
    context = None if args.full_book else (args.context or DEMO_TOKENS)
    questions = tuple(args.question) if args.question else QUESTIONS
    run_demo(
        context,
        args.ratio,
        args.max_new_tokens,
        args.model,
        args.adapter,
        args.budget,
        args.attention,
        questions=questions,
    )
    return 0


# --- compress ------------------------------------------------------------------------------------


def _compress_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
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
    add_model_arguments(parser)
    parser.add_argument("--input", required=True, help="UTF-8 text file of any length, or - for standard input")
    parser.add_argument("--prompt", required=True, help="the question or instruction about the text")
    add_cache_arguments(parser)
    add_sampling_arguments(parser, max_new_tokens=256)
    parser.add_argument("--no-chat", action="store_true", help="do not wrap text and prompt in the chat template")
    parser.add_argument("--stats-json", type=Path, default=None, help="write sizes, rates and peak memory here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    saving = parser.add_argument_group("long reads")
    saving.add_argument(
        "--checkpoint", type=Path, default=None, help="save the session here every few minutes while it reads"
    )
    saving.add_argument(
        "--checkpoint-minutes", type=float, default=5.0, help="minutes of reading between saves (default 5)"
    )
    saving.add_argument(
        "--resume", action="store_true", help="read on from the --checkpoint saved by an interrupted run"
    )


def _generate(args: argparse.Namespace) -> int:
    from .read_checkpoint import ReadCheckpoint, announce_resume
    from .texts import check_text_file

    stream, sampling = cache_config(args), generation_settings(args)
    if args.resume and args.checkpoint is None:
        raise ValueError("--resume reads on from a saved session: give its --checkpoint directory")
    if args.input == "-" and args.resume:
        raise ValueError("--resume needs the input again as a file: standard input cannot be read twice")
    checkpoint = ReadCheckpoint(args.checkpoint, 60 * args.checkpoint_minutes) if args.checkpoint else None
    if checkpoint is not None and not args.resume:
        checkpoint.check_new()
    source = _stdin_chunks() if args.input == "-" else check_text_file(args.input)

    from .loading import load_nugget2d
    from .session import StreamingSession

    model, tokenizer = load_nugget2d(args.model, args.adapter, attention=args.attention, ratio=stream.ratio)
    session = StreamingSession(model, tokenizer, stream, chat=not args.no_chat, progress=not args.quiet)
    if args.resume:
        fresh, session = session, checkpoint.load(model, tokenizer, progress=not args.quiet)
        check_same_reading(fresh, session)
        session.answer_with(fresh.settings)  # the look-back asked now, not the one it was read with
        announce_resume(session, checkpoint.latest())
    session.prompt_ids(args.prompt, sampling)  # refuse a prompt that cannot fit before reading the text
    session.ingest(source, checkpoint=checkpoint, resume=args.resume)
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


def check_same_reading(asked, saved) -> None:
    """``ValueError`` unless the ``saved`` session reads as the flags ``asked`` for (cache and chat template;
    the look-back may differ: it shapes answers, not the reading)."""
    from dataclasses import asdict

    from .cache_config import ANSWER_FIELDS

    wanted, had = asdict(asked.settings), asdict(saved.settings)
    differ = [
        f"{name} {had[name]!r} (asked {wanted[name]!r})"
        for name in wanted
        if wanted[name] != had.get(name) and name not in ANSWER_FIELDS
    ]
    if asked.format != saved.format:
        differ.append("the chat template (--no-chat)")
    if differ:
        raise ValueError(
            "the checkpoint was read with other settings: " + ", ".join(differ) + "; resume with the flags it was "
            "started with"
        )


def _stdin_chunks():
    while True:
        chunk = sys.stdin.read(1 << 16)
        if not chunk:
            return
        yield chunk


# --- commands that live in their own modules -------------------------------------------------------


def _lazy(module: str, configure: str, run: str, *extra: str) -> tuple[Callable, Callable]:
    """A ``(configure, run)`` pair calling ``module.configure(parser, *extra)`` and
    ``module.run(args, *extra)``, importing ``module`` only when called."""

    def configure_command(parser: argparse.ArgumentParser) -> None:
        getattr(importlib.import_module(module, __package__), configure)(parser, *extra)

    def run_command(args: argparse.Namespace) -> int:
        status = getattr(importlib.import_module(module, __package__), run)(args, *extra)
        return 0 if status is None else status

    return configure_command, run_command


# --- the parser ----------------------------------------------------------------------------------

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "demo": ("answer questions about a bundled book in a bounded cache, beside full KV", _demo_arguments, _demo),
    "compress": ("compress a text file into a nugget cache file", _compress_arguments, _compress),
    "generate": (
        "stream a text of any length into a bounded cache and answer a prompt about it",
        _generate_arguments,
        _generate,
    ),
    "train": (
        "train the compressor (LoRA + scorer) on DeepSpeed, here or on Ray Train",
        *_lazy(".train", "add_arguments", "run"),
    ),
    "union": (
        "join adapters' scorers into one that keeps what any of them ranks high",
        *_lazy(".scorer_union", "add_arguments", "run"),
    ),
    "bench": (
        "measure speed, memory and quality of every cache method at one budget",
        *_lazy(".bench_cli", "add_arguments", "run"),
    ),
    "qa": (
        "answer the questions of many documents (JSONL) on Ray, resumably",
        *_lazy(".batch_cli", "add_job_arguments", "run_job", "qa"),
    ),
    "summarize": (
        "summarise many documents (JSONL) on Ray, resumably",
        *_lazy(".batch_cli", "add_job_arguments", "run_job", "summarize"),
    ),
    "score": (
        "score qa/summarize outputs against gold JSONL (accuracy, F1, ROUGE)",
        *_lazy(".batch_cli", "add_score_arguments", "run_score"),
    ),
    "serve": (
        "OpenAI-compatible server with compressed documents (uvicorn or Ray Serve)",
        *_lazy("nugget2d.serve.cli", "add_arguments", "run"),
    ),
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
