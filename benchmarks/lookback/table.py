"""The look-back results table, written from the records into this folder's README (never typed by hand).

Reads ``benchmarks/lookback/*/quality.json`` (``nugget2d bench quality --lookback ...`` runs) and writes
one row per (run, context, method, look-back, selector) between the README's ``table`` markers; a
kvpress press's resident cache is what it leaves unmasked (KVzip stores every entry, masking 90 %).
``--check`` exits 1 when the README differs from what the records give.

    python benchmarks/lookback/table.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nugget2d.runtime.bench_common import run_options
from nugget2d.runtime.marked_block import regenerate, replace_marked

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- table:begin (benchmarks/lookback/table.py) -->", "<!-- table:end -->"
HEADER = (
    "| run | context | method | look-back | selector | placement | cutoff | planted-fact QA | RULER niah_single_1 | "
    "s / answer | s to first token | tokens / answer | resident cache MiB | peak MiB while answering | "
    "tokens read back |"
)


def _cell(record: dict, key: str, digits: int = 2, scale: float = 1.0) -> str:
    value = record.get(key)
    return "" if value is None else f"{value / scale:.{digits}f}"


def _accuracy(record: dict, key: str, count_key: str, examples: str) -> str:
    """``right/asked`` of a metric's answers (blank when the run did not ask it)."""
    if key not in record:
        return ""
    asked = record.get(count_key) or len(record.get(examples, []))
    value = record[key] if not isinstance(record[key], dict) else sum(record[key].values()) / len(record[key])
    return f"{round(value * asked)}/{asked}"


def _placement(asked: str, record: dict) -> str:
    """The run's placement; for ``auto``, what it resolved to in this record (``auto: alone``)."""
    used = record.get("lookback_placements")
    return f"{asked}: {'/'.join(used)}" if asked == "auto" and used else asked


def rows(here: Path = HERE) -> list[str]:
    """One table row per record of every run under ``here``."""
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    for path in sorted(here.glob("*/quality.json")):
        data = json.loads(path.read_text())
        placement = run_options(data).get("lookback_placement", "after")
        cutoff = run_options(data).get("lookback_cutoff", 0.0)  # runs before the cutoff filled their look-back
        for record in data["records"]:
            tokens = record.get("lookback", 0)
            parts = [
                path.parent.name,
                str(record["context"]),
                "full KV" if record["method"] == "full" else record["method"],
                str(tokens) if tokens else "off",
                record.get("lookback_selector", "") if tokens else "",
                _placement(placement, record) if tokens else "",
                f"{cutoff:g}" if tokens and record.get("lookback_selector") != "oracle" else "",
                _accuracy(record, "qa_accuracy", "", "qa_examples"),
                _accuracy(record, "ruler_score", "ruler_samples", "ruler_answers"),
                _cell(record, "seconds_per_answer", 1),
                _cell(record, "first_token_seconds", 2),
                _cell(record, "answer_tokens", 1),
                _cell(record, "cache_bytes_unmasked" if "cache_bytes_unmasked" in record else "cache_bytes", 2, 2**20),
                _cell(record, "peak_question_bytes", 2, 2**20),
                _cell(record, "lookback_read_tokens", 0),
            ]
            lines.append("| " + " | ".join(parts) + " |")
    return lines


def render(readme: str, here: Path = HERE) -> str:
    """``readme`` with the table between the markers replaced by the one the records give."""
    return replace_marked(readme, BEGIN, END, "\n".join(rows(here)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the README's table is out of date")
    args = parser.parse_args()
    return regenerate(HERE / "README.md", render, args.check, "python benchmarks/lookback/table.py")


if __name__ == "__main__":
    sys.exit(main())
