"""How much of the test texts a training run read: replays the run's draws with the training code.

For each run (a ``trainer_state.json`` of a checkpoint, or a ``config.json`` of ``training/``: the
settings that decide which examples each step draws, and the step it reached), rebuilds its examples
(planted facts, ``--exclude`` and all), replays the batches of every step, and counts 16-token runs
of what the steps read (sinks, compressed context, raw window; a continuation's target) that occur
in ``benchmarks/data/test/``. Prints and writes ``{run: {step: {tokens_read, share_in_test,
test_share_read}}}``. Run from the repository root:

    python benchmarks/data/overlap.py --corpus PATH_TO_BOOKS [--steps 40,80] --out FILE.json STATE_OR_CONFIG...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nugget2d.runtime.models import load_model
from nugget2d.runtime.train import TrainConfig, training_examples
from nugget2d.runtime.train_data import batch_at
from nugget2d.runtime.train_exclude import ExcludedText, token_runs

TEST = Path("benchmarks/data/test")


def run_settings(path: Path) -> tuple[dict, int]:
    """The run's config and the steps it took, from a checkpoint's trainer_state.json or a training/ config.json."""
    saved = json.loads(path.read_text())
    if "config" in saved:
        return saved["config"], int(saved["step"])
    return saved, int(saved["steps"])


def overlap(config: dict, steps: list[int], corpus: Path, tokenizer, test: frozenset[int]) -> dict[int, dict]:
    """For each of ``steps``: what the run's steps up to it read, and how much of it (and of the test
    texts) is shared."""
    books = [str(corpus / Path(p).name) for p in config["data"]]
    train, _ = training_examples(TrainConfig.from_saved(config, data=books), tokenizer)
    tokens, shared, seen, report = 0, 0, set(), {}
    for step in range(max(steps)):
        for example in batch_at(train, step, config["batch_size"], config["seed"]):
            ids = example.sinks + example.context + example.recent
            ids += example.target if example.objective == "continue" else ()
            tokens += len(ids)
            for key in token_runs(ids):
                if key in test:
                    shared += 1
                    seen.add(key)
        if step + 1 in steps:
            report[step + 1] = {
                "tokens_read": tokens,
                "share_in_test": round(shared / tokens, 4),
                "test_share_read": round(len(seen) / len(test), 4),
            }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="trainer_state.json or config.json files")
    parser.add_argument("--corpus", type=Path, required=True, help="the folder holding the training books")
    parser.add_argument(
        "--steps", default=None, help="report after these steps (comma-separated; default: the run's last)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    _, tokenizer = load_model()
    test = ExcludedText.from_paths([TEST], tokenizer).runs
    report = {}
    for path in args.runs:
        config, last = run_settings(path)
        steps = [int(s) for s in args.steps.split(",") if int(s) <= last] if args.steps else [last]
        report[str(path)] = overlap(config, steps, args.corpus, tokenizer, test)
        print(path, report[str(path)], flush=True)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
