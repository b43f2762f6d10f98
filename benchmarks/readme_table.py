"""The README's results table, generated from the benchmark records (never typed by hand).

Reads ``benchmarks/quality/c*/quality.json`` (the test texts) and ``benchmarks/speed/speed.json``
and writes the table between the README's ``results`` markers. ``--check`` exits 1 when the README
differs from what the records give. Run from anywhere:

    python benchmarks/readme_table.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results:begin (benchmarks/readme_table.py) -->", "<!-- results:end -->"
NAMES = {
    "full": "full KV",
    "nugget2d": "**nugget2d**",
    "streaming": "StreamingLLM",
    "snapkv": "SnapKV-style",
    "compressive": "compressive (mean-pooled)",
    "ideal": "ideal",
}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def quality_rows(root: Path = ROOT) -> tuple[list[str], list[int], int]:
    """One row per method: cache MiB, continuation and far-recall perplexity per context; the
    contexts and the number of windows per context."""
    runs = sorted(root.glob("benchmarks/quality/c*/quality.json"), key=lambda p: int(p.parent.name[1:]))
    cells: dict[str, dict[int, dict]] = {}
    windows = 0
    for path in runs:
        data = _load(path)
        windows = data["options"]["samples"]
        for record in data["records"]:
            cells.setdefault(record["method"], {})[record["context"]] = record
    contexts = sorted({c for by in cells.values() for c in by})
    rows = []
    for method in sorted(cells, key=lambda m: (m != "full", m != "nugget2d", m)):
        parts = [NAMES.get(method, method)]
        for context in contexts:
            r = cells[method].get(context)
            parts += (
                ["", "", ""]
                if r is None
                else [f"{r['cache_bytes'] / 2**20:.2f}", f"{r['ppl']:.2f}", f"{r['recall_ppl']:.2f}"]
            )
        rows.append("| " + " | ".join(parts) + " |")
    return rows, contexts, windows


def speed_line(root: Path = ROOT) -> str:
    """Decode ms/token of full KV, ideal and nugget2d at the longest context, one thread."""
    records = [r for r in _load(root / "benchmarks/speed/speed.json")["records"] if r.get("threads", 1) == 1]
    longest = max(r["context"] for r in records)
    at = {r["method"]: r for r in records if r["context"] == longest}
    full, nug = at["full"], at["nugget2d"]
    return (
        f"Decoding after {longest:,} tokens (one thread): full KV {full['decode_ms_per_token']:.1f} ms/token, "
        f"peak RSS {full['peak_rss_bytes'] / 2**20:,.0f} MiB; nugget2d {nug['decode_ms_per_token']:.1f} ms/token, "
        f"{nug['peak_rss_bytes'] / 2**20:,.0f} MiB "
        f"({full['decode_ms_per_token'] / nug['decode_ms_per_token']:.2f}× faster)."
    )


def block(root: Path = ROOT) -> str:
    """The Markdown between the markers."""
    rows, contexts, windows = quality_rows(root)
    head = ["method"] + [
        f"{c // 1024}k: {name}" for c in contexts for name in ("cache MiB", "continuation ppl", "far-recall ppl")
    ]
    lines = [
        BEGIN,
        f"Test texts (`benchmarks/data/test/`), {windows} windows per context, 10 % of the context kept "
        "(full KV keeps all), lower perplexity is better:",
        "",
        "| " + " | ".join(head) + " |",
        "|---" + "|---:" * (len(head) - 1) + "|",
        *rows,
        "",
        speed_line(root),
        END,
    ]
    return "\n".join(lines)


def render(readme: str, root: Path = ROOT) -> str:
    """``readme`` with its marked block replaced by :func:`block`; ``ValueError`` without markers."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < 0:
        raise ValueError(f"README.md lacks the markers {BEGIN!r} ... {END!r}")
    return readme[:start] + block(root) + readme[end + len(END) :]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md differs from the records")
    args = parser.parse_args()
    path = ROOT / "README.md"
    current = path.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print("README.md's results block differs from the records: run python benchmarks/readme_table.py")
            return 1
        return 0
    path.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
