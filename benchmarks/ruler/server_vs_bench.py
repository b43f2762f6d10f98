"""RULER through lm-eval's CLI against `nugget2d serve`, beside `nugget2d bench quality --metrics ruler`
on the same samples: the server must answer what the bench answers.

For each method, the server is started with the cache flags of the bench's shape for that method
(`CacheShape(...).settings()`: ratio, budget, raw window, segment, sinks, policy, positions) and
`--compress-threshold RAW_TAIL`; lm-eval's `local-completions` model sends RULER's text prompts
(greedy, `max_gen_toks` as the bench's `--ruler-new-tokens`); the bench runs in process with
`--ruler-raw-tail RAW_TAIL`, so both compress all but the prompt's last RAW_TAIL tokens. Writes
`server_vs_bench.json` (per method: both scores and every sample's two answers) into --out.

    python benchmarks/ruler/server_vs_bench.py --methods full,nugget2d --contexts 2048 --samples 12 \
        --out benchmarks/ruler/server
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from nugget2d.compress import Nugget2DConfig
from nugget2d.runtime.bench_common import CacheShape, configurations, parse_list
from nugget2d.runtime.bench_quality import QualityOptions, run_quality
from nugget2d.runtime.loading import load_nugget2d


def server_flags(shape: CacheShape) -> list[str]:
    """`nugget2d serve` cache flags giving the bench's session settings for ``shape``."""
    settings = shape.settings()
    if settings.positions != "auto":
        raise ValueError(f"nugget2d serve numbers its caches with positions 'auto', not {settings.positions!r}")
    flags = {
        "--ratio": settings.ratio,
        "--budget": settings.budget,
        "--recent": settings.recent,
        "--segment": settings.segment,
        "--sinks": settings.sinks,
        "--policy": settings.policy,
        "--overflow": settings.overflow,
        "--allocation": settings.allocation,
        "--observation-window": settings.observation_window,
    }
    if settings.read_budget is not None:
        flags["--read-budget"] = settings.read_budget
    return [str(part) for flag, value in flags.items() for part in (flag, value)]


def wait_until_up(port: int, process: subprocess.Popen, timeout: float = 600) -> None:
    """Return once the server answers /health; ``RuntimeError`` if it exits or does not come up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nugget2d serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"nugget2d serve did not answer on port {port} within {timeout} s")


def lm_eval_answers(args, shape: CacheShape, tokenizer_dir: str, out: Path) -> dict[tuple[str, int], dict]:
    """Run lm-eval's CLI against a server with ``shape``'s flags; ``{(task, doc id): {answer, score}}``."""
    command = [sys.executable, "-m", "nugget2d.runtime.cli", "serve", "--port", str(args.port)]
    command += ["--model", args.model] if args.model else []
    command += ["--adapter", args.adapter] if args.adapter else []
    command += server_flags(shape) + ["--compress-threshold", str(args.raw_tail), "--slots", "1"]
    command += ["--max-tokens-cap", str(args.new_tokens), "--log-level", "warning"]
    server = subprocess.Popen(command)
    try:
        wait_until_up(args.port, server)
        model_args = (
            f"model=nugget2d,base_url=http://127.0.0.1:{args.port}/v1/completions,tokenizer_backend=None,"
            f"tokenized_requests=False,num_concurrent=1,max_retries=1,timeout=3600"
        )
        metadata = json.dumps({"tokenizer": tokenizer_dir, "max_seq_lengths": [shape.context]})
        subprocess.run(
            [
                *(sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args),
                *("--tasks", ",".join(args.tasks), "--metadata", metadata, "--limit", str(args.samples)),
                *("--gen_kwargs", f"max_gen_toks={args.new_tokens}", "--log_samples", "--output_path", str(out)),
            ],
            check=True,
        )
    finally:
        server.terminate()
        server.wait(timeout=60)
    answers = {}
    for path in out.rglob("samples_*.jsonl"):  # samples_<task>_<time>.jsonl
        task = path.stem.removeprefix("samples_").rsplit("_", 1)[0]
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            answers[task, sample["doc_id"]] = {"answer": sample["resps"][0][0], "score": sample[str(shape.context)]}
    return answers


def main() -> int:
    """Measure both ways for every method and context; write the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="full,nugget2d")
    parser.add_argument("--contexts", default="2048")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--tasks", default="niah_single_1")
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--raw-tail", type=int, default=96, help="the server's --compress-threshold")
    parser.add_argument("--model", default=None)
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    args.tasks = parse_list(args.tasks, str, "tasks")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_nugget2d(args.model, args.adapter, Nugget2DConfig())
    methods, contexts = parse_list(args.methods, str, "methods"), parse_list(args.contexts, int, "contexts")
    results = []
    with tempfile.TemporaryDirectory(prefix="ruler-tokenizer-") as tokenizer_dir:
        tokenizer.save_pretrained(tokenizer_dir)  # lm-eval loads the tokenizer by path, as the bench does
        for method, ratio, context in configurations(methods, [args.ratio], contexts):
            options = QualityOptions(
                methods=[method],
                ratios=[args.ratio],
                contexts=[context],
                metrics=["ruler"],
                ruler_tasks=args.tasks,
                ruler_samples=args.samples,
                ruler_new_tokens=args.new_tokens,
                ruler_raw_tail=args.raw_tail,
            )
            bench_dir = out / f"{method}-{context}" / "bench"
            record = json.loads(run_quality(model, tokenizer, options, bench_dir, args.adapter).read_text())
            (bench,) = record["records"]
            shape = options.shape((method, ratio, context), args.raw_tail + args.new_tokens)
            served = lm_eval_answers(args, shape, tokenizer_dir, out / f"{method}-{context}" / "lm_eval")
            pairs = [(a["answer"], served[a["task"], a["index"]]["answer"]) for a in bench["ruler_answers"]]
            same = sum(mine.strip() == theirs.strip() for mine, theirs in pairs)
            results.append(
                {
                    "method": method,
                    "ratio": ratio,
                    "context": context,
                    "bench_score": bench["ruler_score"],
                    "server_score": sum(v["score"] for v in served.values()) / len(served),
                    "same_answers": same,
                    "samples": len(pairs),
                    "server_flags": server_flags(shape) + ["--compress-threshold", str(args.raw_tail)],
                    "answers": [{"bench": mine, "server": theirs} for mine, theirs in pairs],
                }
            )
            print(json.dumps({k: v for k, v in results[-1].items() if k != "answers"}), flush=True)
    machine = {"cpu_count": os.cpu_count(), "command": " ".join(sys.argv)}
    (out / "server_vs_bench.json").write_text(json.dumps({"machine": machine, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
