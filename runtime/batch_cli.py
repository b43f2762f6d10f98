"""Flags and entry points of ``nugget2d qa``, ``nugget2d summarize`` and ``nugget2d score``.

Only argparse at import time: the model, Ray and ROUGE are imported when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_job_arguments(parser: argparse.ArgumentParser, task: str) -> None:
    """The flags of a batch job (``task`` is ``qa`` or ``summarize``)."""
    from nugget2d.compress import BACKENDS

    shape = "{id, document | document_path" + (", questions: [...]}" if task == "qa" else "}")
    parser.add_argument("--input", required=True, help=f"JSONL, one document a line: {shape}")
    parser.add_argument("--output", required=True, help="JSONL of results; rerunning skips ids already complete")
    parser.add_argument("--model", default=None, help="local HF model directory (default: embedded SmolLM2-135M)")
    parser.add_argument("--adapter", default=None, help="Nugget2D adapter directory, or 'none'")
    parser.add_argument("--attention", default="sdpa", choices=BACKENDS, help="attention backend")
    ray = parser.add_argument_group("ray")
    ray.add_argument("--workers", type=int, default=2, help="actors, each holding one model")
    ray.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0)
    ray.add_argument("--gpus-per-worker", type=float, default=0.0, help="e.g. 1 to put each model on a GPU")
    cache = parser.add_argument_group("cache")
    cache.add_argument("--ratio", type=float, default=0.1, help="fraction of each segment kept as nuggets")
    cache.add_argument("--budget", type=int, default=2048, help="cache entries in all (sinks + nuggets + recent)")
    cache.add_argument("--recent", type=int, default=512, help="last tokens kept raw")
    cache.add_argument("--segment", type=int, default=256, help="tokens encoded per step")
    cache.add_argument("--sinks", type=int, default=4, help="first tokens kept raw (attention sinks)")
    cache.add_argument("--overflow", choices=["evict", "recompress"], default="evict")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=int, default=64 if task == "qa" else 256)
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--repetition-penalty", type=float, default=1.0)
    sampling.add_argument("--seed", type=int, default=None)
    if task == "summarize":
        parser.add_argument(
            "--prompt", default=None, help='instruction asked after each document (default: "Summarize the text...")'
        )
    parser.add_argument("--no-chat", action="store_true", help="do not wrap documents in the chat template")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_job(args: argparse.Namespace, task: str) -> int:
    """Run a batch job from parsed flags; print a one-line report on stderr."""
    from .batch import run_batch_job
    from .batch_worker import SUMMARY_PROMPT, JobSettings
    from .generation import GenerationSettings
    from .session import StreamSettings

    settings = JobSettings(
        task=task,
        model=args.model,
        adapter=args.adapter,
        attention=args.attention,
        stream=StreamSettings(args.ratio, args.budget, args.recent, args.segment, args.sinks, args.overflow),
        generation=GenerationSettings(
            args.max_new_tokens,
            args.temperature,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
        ),
        chat=not args.no_chat,
        prompt=getattr(args, "prompt", None) or SUMMARY_PROMPT,
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
