"""Plot what each scorer/encoder variant costs at 8k: continuation against far recall on the six test
windows, labelled with RULER niah_single_1 and planted-fact answers at 8k where measured.

Reads the ``quality.json`` records named below (``bench quality`` outputs, commands in README.md) and
writes ``frontier/frontier.json`` and ``frontier/frontier.png``. Run from the repository root:
``python benchmarks/needles/frontier.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "frontier"

#: (label, record with 8k ppl and recall_ppl, record with 8k ruler and qa or None)
POINTS = [
    ("books scorer, co-trained (shipped to 12-05)", "scorer-8k-test/books", None),
    ("run 1 scorer as fitted", "scorer-8k-test/run1", None),
    ("planted-fact scorer (shipped 12-05)", "scorer-8k-test/facts", "scorer-test-8k/facts"),
    ("union, weights 1:1", "union-test", "union-test"),
    ("union, weights 1:3", "frontier/union-w3-8k", "frontier/union-w3-8k"),
    ("union, weights 1:6", "frontier/union-w6-8k", "frontier/union-w6-8k"),
    ("LoRA +10 steps, scorer frozen", "freeze-scorer/step10-8k", "freeze-scorer/step10-8k"),
    ("LoRA +30 steps, scorer frozen", "freeze-scorer/step30-8k", "freeze-scorer/step30-8k"),
    ("+30 steps, scorer lr 1e-5", "frontier/scorer-lr-1e-5/step30-8k", None),
    ("its scorer alone, shipped LoRA", "frontier/scorer-lr-1e-5/step30-scorer-only-8k", None),
    ("+30 steps, scorer lr 4e-5", "frontier/scorer-lr-4e-5/step30-8k", "frontier/scorer-lr-4e-5/step30-8k-needles"),
    ("+30 steps, scorer lr 4e-5, recall 0.7", "frontier/scorer-lr-4e-5-recall/step30-8k", None),
    (
        "zero LoRA + 40 steps, scorer lr 3e-5",
        "frontier/cotrain-zero-lora/step40-8k",
        "frontier/cotrain-zero-lora/step40-8k-needles",
    ),
    (
        "zero LoRA + 80 steps, scorer lr 3e-5",
        "frontier/cotrain-zero-lora/step80-8k",
        "frontier/cotrain-zero-lora/step80-8k-needles",
    ),
    (
        "zero LoRA + 160 steps, scorer lr 3e-5",
        "frontier/cotrain-zero-lora/step160-8k",
        "frontier/cotrain-zero-lora/step160-8k-needles",
    ),
    (
        "zero LoRA + 40 steps, facts objective",
        "frontier/cotrain-qa/step40-8k",
        "frontier/cotrain-qa/step40-8k-needles",
    ),
    (
        "zero LoRA + 80 steps, facts objective",
        "frontier/cotrain-qa/step80-8k",
        "frontier/cotrain-qa/step80-8k-needles",
    ),
    (
        "zero LoRA + 40 steps, facts objective, recall 0.5",
        "frontier/cotrain-qa/recall-0.5/step40-8k",
        "frontier/cotrain-qa/recall-0.5/step40-8k-needles",
    ),
    (
        "zero LoRA + 40 steps, facts objective, recall 0.65",
        "frontier/cotrain-qa/recall-0.65/step40-8k",
        "frontier/cotrain-qa/recall-0.65/step40-8k-needles",
    ),
    (
        "recall 0.65, test excluded, step 40",
        "frontier/cotrain-qa/recall-0.65-exclude-test/step40-8k",
        None,
    ),
    (
        "recall 0.65, test excluded, step 60",
        "frontier/cotrain-qa/recall-0.65-exclude-test/step60-8k",
        "frontier/cotrain-qa/recall-0.65-exclude-test/step60-8k-needles",
    ),
    (
        "recall 0.65, test excluded, step 80 (shipped 12-06)",
        "frontier/cotrain-qa/recall-0.65-exclude-test/step80-8k",
        "frontier/cotrain-qa/recall-0.65-exclude-test/step80-8k-needles",
    ),
    ("recall 0.65, step 60", "frontier/cotrain-qa/recall-0.65/step60-8k", None),
    ("recall 0.65, step 80", "frontier/cotrain-qa/recall-0.65/step80-8k", None),
    ("shipped + 30 steps, scorer frozen, facts objective", "frontier/freeze-scorer-facts/step30-8k", None),
    (
        "facts objective step 40, union with books scorer",
        "frontier/cotrain-qa/diagnosis/union-books-8k",
        "frontier/cotrain-qa/diagnosis/union-books-8k-needles",
    ),
]


SHIPPED = {
    "books scorer, co-trained (shipped to 12-05)",
    "planted-fact scorer (shipped 12-05)",
    "recall 0.65, test excluded, step 80 (shipped 12-06)",
}
#: Label offsets (points) where the default (right, just above) would overlap another label.
OFFSETS = {
    "union, weights 1:6": (4, -10),
    "its scorer alone, shipped LoRA": (4, -10),
    "zero LoRA + 40 steps, scorer lr 3e-5": (4, 5),
    "zero LoRA + 160 steps, scorer lr 3e-5": (4, -9),
    "zero LoRA + 40 steps, facts objective": (4, -24),
    "zero LoRA + 40 steps, facts objective, recall 0.5": (4, -12),
    "shipped + 30 steps, scorer frozen, facts objective": (20, 40),
    "recall 0.65, test excluded, step 40": (-110, 22),
    "recall 0.65, test excluded, step 80 (shipped 12-06)": (-230, -16),
    "planted-fact scorer (shipped 12-05)": (-262, -10),
    "zero LoRA + 40 steps, facts objective, recall 0.65": (4, -12),
    "union, weights 1:1": (4, -10),
    "recall 0.65, step 60": (-112, -3),
    "recall 0.65, step 80": (-112, 3),
}


def record_8k(folder: str) -> dict:
    """The 8k nugget2d record of ``folder``'s quality.json."""
    records = json.loads((HERE / folder / "quality.json").read_text())["records"]
    return next(r for r in records if r["context"] == 8192 and r["method"] == "nugget2d")


def rows() -> list[dict]:
    """One row per point: continuation, far recall, and RULER / planted facts where measured."""
    out = []
    for label, ppl_folder, needle_folder in POINTS:
        ppl = record_8k(ppl_folder)
        row = {"label": label, "continuation_ppl": ppl["ppl"], "far_recall_ppl": ppl["recall_ppl"]}
        row["records"] = sorted({ppl_folder, needle_folder or ppl_folder})
        if needle_folder:
            needles = record_8k(needle_folder)
            row["ruler"] = f"{round(needles['ruler_score'] * needles['ruler_samples'])}/{needles['ruler_samples']}"
            row["facts"] = f"{round(needles['qa_accuracy'] * 6)}/6"
        out.append(row)
    return out


def main() -> None:
    """Write the table and the plot."""
    table = rows()
    (OUT / "frontier.json").write_text(json.dumps(table, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(9, 6))
    for row in table:
        shipped = row["label"] in SHIPPED
        ax.scatter(row["continuation_ppl"], row["far_recall_ppl"], s=60 if shipped else 30, c="C3" if shipped else "C0")
        needles = f" (RULER {row['ruler']}, facts {row['facts']})" if "ruler" in row else ""
        offset = OFFSETS.get(row["label"], (4, 3))
        ax.annotate(
            row["label"] + needles,
            (row["continuation_ppl"], row["far_recall_ppl"]),
            fontsize=7,
            xytext=offset,
            textcoords="offset points",
            arrowprops={"arrowstyle": "-", "lw": 0.5} if abs(offset[1]) > 15 else None,  # a label set far off
        )
    ax.set_xlim(right=max(row["continuation_ppl"] for row in table) + 0.9)
    ax.set_xlabel("8k continuation perplexity (6 test windows, lower is better)")
    ax.set_ylabel("8k far-recall perplexity (lower is better)")
    ax.set_title("SmolLM2-135M, 10 % kept: what each variant costs at 8k (2-core CPU, 2026-12-05/06)")
    fig.tight_layout()
    fig.savefig(OUT / "frontier.png", dpi=120)


if __name__ == "__main__":
    main()
