"""Flags and entry points of ``nugget2d qa``, ``nugget2d summarize`` and ``nugget2d score``.

Only argparse at import time: the model, Ray and ROUGE are imported when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_job_arguments(parser: argparse.ArgumentParser, task: str) -> None:
    """The flags of a batch job (``task`` is ``qa`` or ``summarize``)."""
    from .cli_options import add_cache_arguments, add_model_arguments, add_sampling_arguments

    shape = "{id, document | document_path" + (", questions: [...]}" if task == "qa" else "}")
    parser.add_argument("--input", required=True, help=f"JSONL, one document a line: {shape}")
    parser.add_argument("--output", required=True, help="JSONL of results; rerunning skips ids already complete")
    parser.add_argument(
        "--allow-paths-outside",
        action="store_true",
        help="read a document_path that leads outside the input file's folder (absolute, .., ~ or a symlink)",
    )
    add_model_arguments(parser)
    ray = parser.add_argument_group("ray")
    ray.add_argument("--workers", type=int, default=2, help="actors, each holding one model")
    ray.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0)
    ray.add_argument("--gpus-per-worker", type=float, default=0.0, help="e.g. 1 to put each model on a GPU")
    add_cache_arguments(parser, exclude=("positions",))
    add_sampling_arguments(parser, max_new_tokens=64 if task == "qa" else 256)
    if task == "qa":
        parser.add_argument(
            "--max-batch", type=int, default=8, help="questions of a document decoded together, at most (1: in turn)"
        )
    if task == "summarize":
        parser.add_argument(
            "--prompt", default=None, help='instruction asked after each document (default: "Summarize the text...")'
        )
    parser.add_argument("--no-chat", action="store_true", help="do not wrap documents in the chat template")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_job(args: argparse.Namespace, task: str) -> int:
    """Run a batch job from parsed flags; print a one-line report on stderr."""
    from .batch import IncompleteJobError, run_batch_job
    from .batch_worker import SUMMARY_PROMPT, JobSettings
    from .cli_options import cache_config, generation_settings

    settings = JobSettings(
        task=task,
        model=args.model,
        adapter=args.adapter,
        attention=args.attention,
        stream=cache_config(args),
        generation=generation_settings(args),
        chat=not args.no_chat,
        prompt=getattr(args, "prompt", None) or SUMMARY_PROMPT,
        allow_paths_outside=args.allow_paths_outside,
        max_batch=getattr(args, "max_batch", 8),
    )
    try:
        report = run_batch_job(
            args.input,
            args.output,
            settings,
            workers=args.workers,
            address=args.address,
            cpus_per_worker=args.cpus_per_worker,
            gpus_per_worker=args.gpus_per_worker,
            progress=not args.quiet,
        )
    except IncompleteJobError as err:
        print(err.report.summary(task, args.output), file=sys.stderr)
        raise
    except ConnectionError as err:
        raise ValueError(f"cannot reach the Ray cluster at {args.address}: {_first_line(err)}") from err
    except Exception as err:
        from ray.exceptions import RayError

        if isinstance(err, RayError):  # a worker died or the cluster went away: what is written stays
            raise ValueError(f"the Ray job failed ({_first_line(err)}); rerun to finish the rest") from err
        raise
    print(report.summary(task, args.output), file=sys.stderr)
    return 0


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``nugget2d score``."""
    parser.add_argument("--task", choices=["qa", "summarize"], required=True)
    parser.add_argument("--pred", required=True, help="the output JSONL of `nugget2d qa` or `nugget2d summarize`")
    parser.add_argument(
        "--gold", required=True, help="JSONL: {id, question, answers: [...]} (qa) or {id, summary} (summarize)"
    )


def run_score(args: argparse.Namespace) -> int:
    """Print the scores as JSON on stdout."""
    from .scoring import score_files

    print(json.dumps(score_files(args.task, args.pred, args.gold), indent=2))
    return 0


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
