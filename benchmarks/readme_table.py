"""The README's results table, generated from the benchmark records (never typed by hand).

Reads ``benchmarks/quality/c*/quality.json`` (the test texts), ``benchmarks/ruler/*/quality.json``
(RULER ``niah_single_1`` as lm-eval generates it), ``benchmarks/lookback/*/quality.json`` (the same
with look-back; the ``auto-*`` runs, the default placement, for the long-document QA table) and
``benchmarks/speed/speed.json``, and writes
the tables between the README's ``results`` markers. ``--check`` exits 1 when the README
differs from what the records give. Run from anywhere:

    python benchmarks/readme_table.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nugget2d.runtime.bench_common import run_options
from nugget2d.runtime.marked_block import regenerate, replace_marked

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results:begin (benchmarks/readme_table.py) -->", "<!-- results:end -->"
NAMES = {
    "full": "full KV",
    "nugget2d": "**nugget2d**",
    "streaming": "StreamingLLM",
    "snapkv": "SnapKV-style",
    "compressive": "compressive (mean-pooled)",
    "ideal": "ideal",
    "kvpress:KVzip": "kvpress KVzip",
    "kvpress:ExpectedAttention": "kvpress ExpectedAttention",
}
RULER_TASK = "niah_single_1"
LOOKBACK = 256  # the look-back row's tokens read back per answer (BM25-chosen spans)
QA_RUNS = "benchmarks/lookback/auto-*/quality.json"  # the default placement's runs, full KV beside it


def ruler_rows(root: Path = ROOT) -> tuple[list[str], list[int], dict[int, int]]:
    """One row per method: RULER ``niah_single_1`` accuracy at 10 % kept (full KV: all) per context,
    from the record with the most samples; the contexts and the samples per context."""
    cells: dict[str, dict[int, float]] = {}
    counts: dict[tuple[str, int], int] = {}
    samples: dict[int, int] = {}
    for path in sorted(root.glob("benchmarks/ruler/*/quality.json")):
        for record in _load(path)["records"]:
            score = record.get("ruler", {}).get(RULER_TASK)
            count = record.get("ruler_samples", 0)
            key = (record["method"], record["context"])
            if score is None or record["ratio"] not in (0.1, 1.0) or count <= counts.get(key, 0):
                continue
            counts[key] = count
            cells.setdefault(record["method"], {})[record["context"]] = score
            samples[record["context"]] = max(samples.get(record["context"], 0), count)
    contexts = sorted({c for by in cells.values() for c in by})
    rows = []
    for method in sorted(cells, key=lambda m: (m != "full", m != "nugget2d", m)):
        scores = [cells[method].get(c) for c in contexts]
        cells_text = ["" if s is None else f"{s:.2f}" for s in scores]
        rows.append("| " + " | ".join([NAMES.get(method, method), *cells_text]) + " |")
        if method == "nugget2d":
            rows.append(_lookback_row(root, contexts))
    return rows, contexts, samples


def _lookback_row(root: Path, contexts: list[int]) -> str:
    """nugget2d with look-back ``LOOKBACK`` (BM25, the default placement when it ran: after the cache
    before 2026-12-06, ``auto`` since) at 10 % resident, pooled over the look-back runs
    (``benchmarks/lookback/``), each cell with its own sample count."""
    right: dict[int, float] = {}
    asked: dict[int, int] = {}
    for path in sorted(root.glob("benchmarks/lookback/*/quality.json")):
        data = _load(path)
        if run_options(data).get("lookback_placement", "after") not in ("after", "auto"):  # the default then, now
            continue
        for record in data["records"]:
            if (record["method"], record["ratio"], record.get("lookback"), record.get("lookback_selector")) != (
                "nugget2d",
                0.1,
                LOOKBACK,
                "bm25",
            ) or RULER_TASK not in record.get("ruler", {}):
                continue
            count = record["ruler_samples"]
            right[record["context"]] = right.get(record["context"], 0) + record["ruler"][RULER_TASK] * count
            asked[record["context"]] = asked.get(record["context"], 0) + count
    cells = [f"{right[c] / asked[c]:.2f} ({asked[c]})" if c in asked else "" for c in contexts]
    return "| " + " | ".join([f"**nugget2d + look-back {LOOKBACK}** (samples)", *cells]) + " |"


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def quality_rows(root: Path = ROOT) -> tuple[list[str], list[int], dict[int, int]]:
    """One row per method: cache MiB, continuation and far-recall perplexity per context; the
    contexts and the number of windows per context."""
    runs = sorted(root.glob("benchmarks/quality/c*/quality.json"), key=lambda p: int(p.parent.name[1:]))
    cells: dict[str, dict[int, dict]] = {}
    windows: dict[int, int] = {}
    for path in runs:
        data = _load(path)
        for record in data["records"]:
            windows[record["context"]] = len(record.get("ppl_by_window", [])) or run_options(data)["samples"]
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
                else [f"{r['cache_bytes'] / 2**20:.2f}", _with_spread(r, "ppl"), _with_spread(r, "recall_ppl")]
            )
        rows.append("| " + " | ".join(parts) + " |")
    return rows, contexts, windows


def _with_spread(record: dict, metric: str) -> str:
    """``value`` and, when the record has each window's value, their range: ``31.97 (28.40–36.01)``."""
    text = f"{record[metric]:.2f}"
    windows = record.get(f"{metric}_by_window")
    return f"{text} ({min(windows):.2f}–{max(windows):.2f})" if windows and len(windows) > 1 else text


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
        "Test texts (`benchmarks/data/test/`), "
        + ", ".join(f"{windows[c]} windows at {c // 1024}k" for c in contexts)
        + " (their range in brackets where recorded), 10 % of the context kept (full KV keeps all), lower "
        "perplexity is better:",
        "",
        "| " + " | ".join(head) + " |",
        "|---" + "|---:" * (len(head) - 1) + "|",
        *rows,
        "",
        *_ruler_block(root),
        *_qa_block(root),
        speed_line(root),
    ]
    return "\n".join(lines)


def _ruler_block(root: Path) -> list[str]:
    """The RULER table's lines (none when no RULER record exists)."""
    rows, contexts, samples = ruler_rows(root)
    if not rows:
        return []
    head = ["method"] + [f"{c // 1024}k ({samples[c]} samples)" for c in contexts]
    caption = (
        f"RULER `{RULER_TASK}` (lm-eval's samples, greedy; the `peers` install beside kvpress, transformers 5.2), "
        "share answered, 10 % kept:"
    )
    return _table(caption, head, rows)


def _table(caption: str, head: list[str], rows: list[str]) -> list[str]:
    """A captioned Markdown table (first column left-aligned, the rest right), a blank line after."""
    return [caption, "", "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|", *rows, ""]


def qa_rows(root: Path = ROOT) -> tuple[list[str], list[int]]:
    """Planted-fact QA and RULER answered (right/asked) and seconds per answer, per method and context,
    pooled over the :data:`QA_RUNS` records: full KV, nugget2d, nugget2d with look-back ``LOOKBACK``."""
    sums: dict[tuple[str, int], dict[str, float]] = {}
    for path in sorted(root.glob(QA_RUNS)):
        for record in _load(path)["records"]:
            tokens = record.get("lookback", 0)
            if record["ratio"] not in (0.1, 1.0) or tokens not in (0, LOOKBACK):
                continue
            name = NAMES.get(record["method"], record["method"])
            name = f"**nugget2d + look-back {tokens}**" if tokens else name
            cell = sums.setdefault((name, record["context"]), {})
            facts = len(record.get("qa_examples", []))
            needles = record.get("ruler_samples", 0) if RULER_TASK in record.get("ruler", {}) else 0
            answers = facts + needles
            for key, right, asked in (
                ("facts", record.get("qa_accuracy", 0.0) * facts, facts),
                ("ruler", record.get("ruler", {}).get(RULER_TASK, 0.0) * needles, needles),
                ("seconds", record.get("seconds_per_answer", 0.0) * answers, answers),
            ):
                cell[key] = cell.get(key, 0.0) + right
                cell[key + "_asked"] = cell.get(key + "_asked", 0) + asked
    contexts = sorted({c for _, c in sums})
    names = sorted({n for n, _ in sums}, key=lambda n: ("full" not in n, "look-back" in n, n))

    def text(name: str, context: int) -> str:
        cell = sums.get((name, context), {})
        if not cell.get("seconds_asked"):
            return "—"
        parts = [
            f"{round(cell[k])}/{cell[k + '_asked']}" if cell.get(k + "_asked") else "—" for k in ("facts", "ruler")
        ]
        return f"{parts[0]} · {parts[1]}, {cell['seconds'] / cell['seconds_asked']:.1f} s"

    return ["| " + " | ".join([n, *(text(n, c) for c in contexts)]) + " |" for n in names], contexts


def _qa_block(root: Path) -> list[str]:
    """The long-document QA table's lines (none without :data:`QA_RUNS` records)."""
    rows, contexts = qa_rows(root)
    if not rows:
        return []
    caption = (
        f"Long-document QA, test texts (`benchmarks/lookback/auto-*`), 10 % resident: planted facts · RULER "
        f"needles answered, seconds per answer; look-back {LOOKBACK} reads BM25's spans after the cache inside "
        "the model's window, with the text's opening alone past it (32k):"
    )
    return _table(caption, ["method"] + [f"{c // 1024}k" for c in contexts], rows)


def render(readme: str, root: Path = ROOT) -> str:
    """``readme`` with its marked block replaced by :func:`block`; ``ValueError`` without markers."""
    return replace_marked(readme, BEGIN, END, block(root))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md differs from the records")
    args = parser.parse_args()
    return regenerate(ROOT / "README.md", render, args.check, "python benchmarks/readme_table.py")


if __name__ == "__main__":
    sys.exit(main())
