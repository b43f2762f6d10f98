"""RULER results from ``bench quality --metrics ruler`` records: a plot of score against the fraction kept
(per task and context, one line per method) and a markdown table (task × length × method at chosen ratios).

``python -m nugget2d.runtime.bench_ruler_plot benchmarks/ruler`` reads every ``quality.json`` under the
folder and writes ``ruler.png`` and ``table.md`` there, and rewrites the table between the markers
``<!-- ruler-table -->`` and ``<!-- /ruler-table -->`` of the folder's ``README.md`` if it has them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .bench_plots import _pyplot
from .bench_ruler import TASKS
from .marked_block import replace_marked

#: Table and legend order and names; methods not listed follow, by name.
METHODS = {
    "full": "full KV",
    "nugget2d": "nugget2d",
    "kvpress:KVzip": "kvpress KVzip",
    "kvpress:ExpectedAttention": "kvpress ExpectedAttention",
    "compressive": "compressive",
    "snapkv": "SnapKV-style",
    "streaming": "StreamingLLM",
}
FRACTIONS = (0.1, 0.25, 0.5)  # the plot's x axis always shows these
MARKERS = "os^Dvp*"
START, END = "<!-- ruler-table -->", "<!-- /ruler-table -->"


@dataclass(frozen=True)
class Score:
    """One RULER task's mean score (0–1) for a method, fraction kept and length, over ``samples`` prompts."""

    task: str
    length: int
    method: str
    ratio: float  # fraction kept; 1.0 for full KV
    score: float
    samples: int
    source: str  # the record file it came from


def scores(paths: list[Path]) -> list[Score]:
    """Every task's score in the records of ``paths`` (``quality.json`` files). Where two records hold
    the same task, length, method and ratio, the one over more samples is kept (the later file on a tie)."""
    best: dict[tuple, Score] = {}
    for path in sorted(paths):
        for record in json.loads(Path(path).read_text())["records"]:
            for task, value in record.get("ruler", {}).items():
                count = sum(1 for answer in record.get("ruler_answers", []) if answer["task"] == task)
                score = Score(task, record["context"], record["method"], record["ratio"], value, count, str(path))
                key = (task, score.length, score.method, score.ratio)
                if key not in best or count >= best[key].samples:
                    best[key] = score
    return sorted(best.values(), key=lambda s: (_task_order(s.task), s.length, _order(s.method), s.ratio))


def _task_order(task: str) -> tuple[int, str]:
    return (TASKS.index(task), task) if task in TASKS else (len(TASKS), task)


def _order(method: str) -> tuple[int, str]:
    names = list(METHODS)
    return (names.index(method), method) if method in names else (len(names), method)


def _cell(score: Score) -> str:
    return f"{score.score:.2f} ({score.samples})"


def _label(method: str) -> str:
    return METHODS.get(method, method)


def table(rows: list[Score], ratios: tuple[float, ...] = (0.1, 0.25)) -> str:
    """A markdown table: one row per task, length and method, a column per fraction kept in ``ratios``,
    each cell the score and the samples behind it (full KV, which keeps everything, fills every column)."""
    head = ["task", "length", "method", *(f"{ratio:.0%} kept (samples)" for ratio in ratios)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * len(ratios)]
    groups: dict[tuple, dict[float, Score]] = {}
    for row in rows:
        groups.setdefault((row.task, row.length, row.method), {})[row.ratio] = row
    for (task, length, method), by_ratio in groups.items():
        if method == "full":
            cells = [_cell(next(iter(by_ratio.values())))] * len(ratios)
        else:
            cells = [_cell(by_ratio[r]) if r in by_ratio else "—" for r in ratios]
        if all(cell == "—" for cell in cells):
            continue
        name = f"**{_label(method)}**" if method == "nugget2d" else _label(method)
        lines.append(f"| {task} | {length:,} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[Score], path: str | Path, title: str = "") -> Path:
    """Score against fraction kept, a panel per task and length that a compressing method ran, one line
    per method (full KV dashed, at its score); writes ``path``."""
    plt = _pyplot()
    panels = sorted({(row.task, row.length) for row in rows if row.method != "full"})
    if not panels:
        raise ValueError("no compressing method's RULER score to plot (full KV alone has no fraction kept)")
    columns = min(len(panels), 3)
    lines_count = -(-len(panels) // columns)
    figure, axes = plt.subplots(lines_count, columns, figsize=(5.2 * columns, 4 * lines_count), squeeze=False)
    methods = sorted({row.method for row in rows}, key=_order)
    colours = {method: f"C{i % 10}" for i, method in enumerate(methods)}
    for axis, (task, length) in zip(axes.flat, panels):
        here = [row for row in rows if (row.task, row.length) == (task, length)]
        ratios = sorted({row.ratio for row in here if row.method != "full"} | set(FRACTIONS))
        for i, method in enumerate(methods):
            points = sorted((row for row in here if row.method == method), key=lambda row: row.ratio)
            if not points:
                continue
            samples = "/".join(str(n) for n in sorted({p.samples for p in points}))
            label = f"{_label(method)} (n={samples})"
            if method == "full":
                axis.axhline(points[0].score, color=colours[method], linestyle="--", label=label)
                continue
            style = {"marker": MARKERS[i % len(MARKERS)], "markersize": 11 - 1.2 * i, "alpha": 0.85}  # overlaps show
            xs, ys = [p.ratio for p in points], [p.score for p in points]
            axis.plot(xs, ys, "-", label=label, color=colours[method], **style)
        axis.set_xlim(ratios[0] - 0.04, ratios[-1] + 0.04)
        axis.set_xticks(ratios, [f"{r:.0%}" for r in ratios])
        axis.set_ylim(-0.05, 1.05)
        axis.set_xlabel("fraction of the context kept")
        axis.set_ylabel("RULER score (0-1)")
        axis.set_title(f"{task}, {length:,} tokens")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


def _title(source: str) -> str:
    machine = json.loads(Path(source).read_text()).get("machine", {})
    adapter = "untrained adapter" if machine.get("untrained_adapter") else "shipped adapter"
    where = f"{machine.get('cpu', machine.get('device', '?'))}, {machine.get('cpu_count', '?')} cores"
    return (
        f"RULER, {machine.get('model', 'model')} + {adapter}, greedy ({where}, {machine.get('torch_threads')} thread)"
    )


def update_readme(readme: Path, text: str) -> bool:
    """Put ``text`` between the table markers of ``readme``; ``False`` (file unchanged) without them."""
    if not readme.exists():
        return False
    try:
        readme.write_text(replace_marked(readme.read_text(), START, END, text))
    except ValueError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    """Write ``ruler.png`` and ``table.md`` (and the README's table) from the records under a folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder searched for quality.json records (recursively)")
    parser.add_argument("--ratios", default="0.1,0.25", help="fractions kept in the table (comma-separated)")
    args = parser.parse_args(argv)
    rows = scores(list(args.folder.rglob("quality.json")))
    if not rows:
        print(f"no RULER records under {args.folder}", file=sys.stderr)
        return 1
    text = table(rows, tuple(float(r) for r in args.ratios.split(",")))
    (args.folder / "table.md").write_text(text)
    plot(rows, args.folder / "ruler.png", _title(rows[0].source))
    updated = update_readme(args.folder / "README.md", text)
    print(
        f"wrote {args.folder / 'table.md'}, {args.folder / 'ruler.png'}" + (" and README.md's table" if updated else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
