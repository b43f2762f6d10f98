"""A million tokens streamed through the default cache: `nugget2d generate` over books concatenated to
``--tokens`` tokens, run as a user runs it (a subprocess, `--stats-json`), then its reading log — mean
ms per segment, cache bytes, RSS now and peak at 10k, 20k, 50k, 100k, 200k, 500k, 1M tokens — written
as ``million.json`` and plotted as ``million.png`` next to this file (or ``--out``).

    .venv/bin/python benchmarks/streaming/million.py --corpus BOOKS_DIR   # hours on one CPU core
    .venv/bin/python benchmarks/streaming/million.py --corpus BOOKS_DIR --resume   # after an interruption

The books are read in name order and repeated from the first if they hold fewer tokens than asked. The
read saves its session every few minutes (`generate --checkpoint`) in ``--work``, beside the joined
text, so an interrupted run reads on from there with ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "What is the last story in this text about? Answer in one sentence."


def build_input(corpus: Path, tokens: int, tokenizer, target: Path) -> list[str]:
    """Write the books of ``corpus`` (``*.txt``, name order, repeated as needed) to ``target`` up to
    ``tokens`` tokens of ``tokenizer``; return the books used, in order."""
    books = sorted(corpus.glob("*.txt"))
    if not books:
        raise SystemExit(f"no *.txt books in {corpus}")
    used, have = [], 0
    with target.open("w", encoding="utf-8") as out:
        while have < tokens:
            book = books[len(used) % len(books)]
            text = book.read_text(encoding="utf-8")
            ids = tokenizer(text, add_special_tokens=False).input_ids
            if have + len(ids) > tokens:
                text = tokenizer.decode(ids[: tokens - have])
            out.write(text + "\n\n")
            have += min(len(ids), tokens - have)
            used.append(book.name)
    return used


def plot(log: list[dict], path: Path) -> None:
    """Ms per segment and RSS (now, peak) against tokens read, log x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [point["tokens"] for point in log]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(tokens, [point["segment_ms"] for point in log], marker="o")
    left.set(xscale="log", xlabel="tokens read", ylabel="ms per segment (mean since previous point)")
    left.set_ylim(bottom=0)
    right.plot(tokens, [point["rss_bytes"] / 2**30 for point in log], marker="o", label="RSS now")
    right.plot(tokens, [point["peak_rss_bytes"] / 2**30 for point in log], marker="x", label="peak RSS")
    right.plot(tokens, [point["cache_bytes"] / 2**30 for point in log], marker="s", label="cache")
    right.set(xscale="log", xlabel="tokens read", ylabel="GiB")
    right.set_ylim(bottom=0)
    right.legend()
    fig.suptitle("nugget2d generate over a long input: default cache")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, required=True, help="a folder of plain-text books")
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument(
        "--work", type=Path, default=None, help="joined text and checkpoints (default: /tmp/nugget2d-million-TOKENS)"
    )
    parser.add_argument("--resume", action="store_true", help="read on from the checkpoint in --work")
    args = parser.parse_args(argv)
    work = args.work or Path(f"/tmp/nugget2d-million-{args.tokens}")

    from transformers import AutoTokenizer

    from nugget2d.runtime.models import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(args.model))
    args.out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    text, listing = work / "books.txt", work / "books.json"
    if args.resume and text.is_file() and listing.is_file():
        books = json.loads(listing.read_text())
    else:
        books = build_input(args.corpus, args.tokens, tokenizer, text)
        listing.write_text(json.dumps(books))
    stats_path = work / "stats.json"
    options = ["--prompt", PROMPT, "--max-new-tokens", "48"] + (["--model", args.model] if args.model else [])
    saving = ["--checkpoint", str(work / "checkpoint")] + (["--resume"] if args.resume else [])
    command = ["generate", "--input", str(text), *options, *saving, "--stats-json", str(stats_path)]
    started = time.perf_counter()
    # stdout (the answer) is kept; stderr (the reading progress bar) goes to the terminal as it comes
    done = subprocess.run([str(Path(sys.executable).parent / "nugget2d"), *command], stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        return done.returncode
    stats = json.loads(stats_path.read_text())
    record = {
        "command": " ".join(["nugget2d", "generate", "--input", "BOOKS.txt", *options, "--checkpoint", "DIR"]),
        "resumed": args.resume,
        "books": books,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "load_average_at_end": list(os.getloadavg()),
        "wall_seconds_last_run": wall,
        "answer": done.stdout.strip(),
        "stats": stats,
    }
    (args.out / "million.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(stats["reading_log"], args.out / "million.png")
    for point in stats["reading_log"]:
        print(
            f"{point['tokens']:>9,} tokens  {point['segment_ms']:7.1f} ms/segment  cache "
            f"{point['cache_bytes'] / 2**20:6.1f} MiB  RSS {point['rss_bytes'] / 2**30:.2f} GiB  "
            f"peak {point['peak_rss_bytes'] / 2**30:.2f} GiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
