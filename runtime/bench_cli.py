"""Arguments and entry point of ``nugget2d bench speed|quality`` (heavy imports happen in :func:`run`)."""

from __future__ import annotations

import argparse

from .bench_common import READINGS
from .cache_config import PLACEMENTS
from .cli_options import add_cache_arguments, add_model_arguments
from .lookback import DEFAULT_CUTOFF
from .session import POSITIONS

DEFAULT_METHODS = "full,nugget2d,streaming,snapkv,compressive"
#: ``bench speed`` also measures ``ideal``: a plain cache as small as nugget2d's (``bench_speed``).
SPEED_METHODS = "full,ideal,nugget2d,streaming,snapkv,compressive"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``speed``, ``quality`` and ``merge`` sub-commands and their options to ``parser``."""
    parser.epilog = (
        "speed and quality take --model, --adapter, --contexts, --methods, --ratios, --input and --out "
        "(see `nugget2d bench speed --help`); results are JSON plus PNG"
    )  # also keeps `nugget2d bench --help` naming --model, as every model-loading command's help does
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")
    speed = sub.add_parser("speed", help="prefill and decode time, cache bytes, peak memory vs context length")
    _common(speed, contexts="1024,2048,4096,8192,16384,32768", ratios="0.05,0.1,0.2", methods=SPEED_METHODS)
    speed.add_argument("--repeats", type=int, default=2, help="rounds over all configurations (interleaved)")
    speed.add_argument("--decode-tokens", type=int, default=64, help="decode steps timed per run (median taken)")
    speed.add_argument(
        "--threads",
        default=None,
        help="torch thread counts, each measured as rows of its own in the same interleaved run (e.g. 1,2; "
        "default: torch's setting)",
    )
    quality = sub.add_parser("quality", help="continuation and far-recall perplexity, autoencoding BLEU, planted QA")
    _common(quality, contexts="2048", ratios="0.05,0.1,0.2")
    quality.add_argument(
        "--metrics",
        default="ppl,recall_ppl,bleu,qa",
        help="any of ppl, recall_ppl, bleu, qa, ruler (comma-separated; ruler needs the eval extra)",
    )
    quality.add_argument("--samples", type=int, default=4, help="text windows per context for ppl and recall_ppl")
    quality.add_argument("--continuation", type=int, default=256, help="tokens scored after each context")
    quality.add_argument("--ae-tokens", type=int, default=128, help="tokens per autoencoding sample")
    quality.add_argument("--ae-samples", type=int, default=8, help="autoencoding samples")
    quality.add_argument("--depths", default="0.1,0.5,0.9", help="where facts are planted (0 = start, 1 = end)")
    quality.add_argument("--qa-samples", type=int, default=2, help="planted facts per depth and context")
    quality.add_argument(
        "--ruler-tasks", default="niah_single_1", help="RULER tasks lm-eval generates offline (comma-separated)"
    )
    quality.add_argument("--ruler-samples", type=int, default=4, help="RULER samples per task and context")
    quality.add_argument("--ruler-new-tokens", type=int, default=32, help="tokens generated per RULER answer")
    quality.add_argument(
        "--ruler-raw-tail",
        type=int,
        default=None,
        help="read each RULER prompt's last N tokens raw after compressing the rest, as `nugget2d serve "
        "--compress-threshold N` does (default: the question line)",
    )
    quality.add_argument(
        "--recent-share", type=float, default=0.25, help="share of each compressing method's budget kept raw"
    )
    quality.add_argument(
        "--positions",
        choices=POSITIONS,
        default="auto",
        help="how compressing methods number their cache (as the sessions' --positions; auto: text positions "
        "for per-head caches inside the model's window, else by entry)",
    )
    quality.add_argument(
        "--reading",
        choices=READINGS,
        default="stream",
        help="compressing methods compress while streaming the context (memory bounded by the budget) or once "
        "it is read whole with full attention (as kvpress presses do; memory grows with the context)",
    )
    add_cache_arguments(quality, only=("observation_window", "surprise_votes", "scorer_first_share"))
    quality.add_argument(
        "--lookback",
        default="0",
        help="qa, ruler: tokens of the text read back raw before each answer, each a configuration of its own "
        "(comma-separated; 0 = off)",
    )
    quality.add_argument(
        "--lookback-selector",
        default="bm25",
        help="how look-back chooses what to read: attention, bm25, hybrid, oracle (the span holding the answer); "
        "comma-separated, each a configuration of its own",
    )
    quality.add_argument(
        "--lookback-placement",
        choices=PLACEMENTS,
        default="auto",
        help="look-back spans after the cache's entries, at their text positions (while the cache keeps them), "
        "alone (the text's opening and the spans, the resident cache hidden for the answer), or auto (the "
        "default: after while the cache is numbered by text position, alone past the model's window)",
    )
    quality.add_argument("--lookback-span", type=int, default=64, help="tokens per look-back window")
    quality.add_argument(
        "--lookback-cutoff",
        type=float,
        default=DEFAULT_CUTOFF,
        help="look-back reads no window scoring below this share of the best window's score (0: fill the look-back)",
    )
    merge = sub.add_parser("merge", help="join the results of several runs of one kind into one JSON and PNG")
    merge.add_argument("runs", nargs="+", help="result directories or JSON files (all speed or all quality)")
    merge.add_argument("--out", required=True, help="directory for the merged JSON and PNG")


def _common(parser: argparse.ArgumentParser, contexts: str, ratios: str, methods: str = DEFAULT_METHODS) -> None:
    add_model_arguments(parser)
    parser.add_argument("--contexts", default=contexts, help="context lengths in tokens (comma-separated)")
    parser.add_argument(
        "--methods",
        default=methods,
        help="cache methods (comma-separated); speed also takes ideal (the unmodified model over a plain cache "
        "as small as nugget2d's), quality kvpress:<Press> references (the peers extra)",
    )
    parser.add_argument("--ratios", default=ratios, help="fractions of the context kept (comma-separated)")
    parser.add_argument("--input", nargs="+", default=None, help="plain-text files (default: the bundled book)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="directory for the JSON and PNG results")


def run(args: argparse.Namespace) -> int:
    """Validate the options, load the model, run the chosen benchmark; print where results went."""
    from nugget2d.compress import Nugget2DConfig

    from .bench_common import merge_results, parse_list
    from .texts import check_text_file

    if args.bench == "merge":
        path = merge_results(args.runs, args.out)
        print(f"wrote {path} and {path.with_suffix('.png')}")
        return 0
    common = dict(
        methods=parse_list(args.methods, str, "methods"),
        ratios=parse_list(args.ratios, float, "ratios"),
        contexts=parse_list(args.contexts, int, "contexts"),
        seed=args.seed,
        inputs=[str(check_text_file(path)) for path in args.input or []],
    )
    if args.bench == "speed":
        from .bench_speed import SpeedOptions, run_speed

        threads = parse_list(args.threads, int, "threads") if args.threads else []
        options = SpeedOptions(**common, repeats=args.repeats, decode_tokens=args.decode_tokens, threads=threads)
        runner = run_speed
    else:
        from .bench_quality import QualityOptions, run_quality

        options = QualityOptions(
            **common,
            metrics=parse_list(args.metrics, str, "metrics"),
            samples=args.samples,
            continuation=args.continuation,
            ae_tokens=args.ae_tokens,
            ae_samples=args.ae_samples,
            depths=parse_list(args.depths, float, "depths"),
            qa_samples=args.qa_samples,
            ruler_tasks=parse_list(args.ruler_tasks, str, "ruler-tasks"),
            ruler_samples=args.ruler_samples,
            ruler_new_tokens=args.ruler_new_tokens,
            ruler_raw_tail=args.ruler_raw_tail,
            recent_share=args.recent_share,
            positions=args.positions,
            reading=args.reading,
            observation_window=args.observation_window,
            surprise_votes=args.surprise_votes,
            scorer_first_share=args.scorer_first_share,
            lookback=parse_list(args.lookback, int, "lookback"),
            lookback_selectors=parse_list(args.lookback_selector, str, "lookback-selector"),
            lookback_placement=args.lookback_placement,
            lookback_span=args.lookback_span,
            lookback_cutoff=args.lookback_cutoff,
        )
        runner = run_quality
    from .loading import load_nugget2d

    model, tokenizer = load_nugget2d(args.model, args.adapter, Nugget2DConfig(), args.attention)
    path = runner(model, tokenizer, options, args.out, adapter=model.adapter_source)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0
