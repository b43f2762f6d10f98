"""PNG plots of benchmark records: one line per method (and ratio), matplotlib without a display."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

SPEED_PANELS = (
    ("prefill_s", "prefill (s)"),
    ("decode_ms_per_token", "decode (ms / token)"),
    ("cache_bytes", "cache (MiB)"),
    ("peak_rss_bytes", "peak RSS (MiB)"),
    ("decode_speedup_vs_full", "decode speed-up over full KV (×)"),
    ("fraction_of_ideal_speedup", "fraction of ideal's speed-up"),
)
QUALITY_PANELS = (
    ("ppl", "continuation perplexity"),
    ("recall_ppl", "far-recall perplexity"),
    ("bleu", "autoencoding BLEU (0-1)"),
    ("qa_accuracy", "planted-fact QA accuracy"),
    ("ruler_score", "RULER score (0-1, mean over tasks)"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(record: dict, threads: bool = False) -> str:
    name = "full KV" if record["method"] == "full" else f"{record['method']} r={record['ratio']:g}"
    return f"{name} t={record['threads']}" if threads else name


def _scaled(key: str, value: float) -> float:
    return value / 2**20 if key.endswith("_bytes") else value


def plot_speed(records: list[dict], path: str | Path, title: str = "") -> Path:
    """Time, memory and the gains over full KV (and fractions of ``ideal``'s) against context length
    (log-log), one line per method and ratio (and thread count, when several); writes ``path``."""
    plt = _pyplot()
    threads = len({record.get("threads") for record in records}) > 1
    lines: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        lines[_label(record, threads)].append(record)
    colours = {label: f"C{i % 10}" for i, label in enumerate(sorted(lines))}  # one colour per line in every panel
    figure, axes = plt.subplots(2, 3, figsize=(16, 8))
    for axis, (key, name) in zip(axes.flat, SPEED_PANELS):
        for label, points in sorted(lines.items()):
            points = sorted((p for p in points if p.get(key) is not None), key=lambda r: r["context"])
            if not points:
                continue
            axis.plot(
                [p["context"] for p in points],
                [_scaled(key, p[key]) for p in points],
                "o-",
                label=label,
                markersize=4,
                color=colours[label],
            )
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("context (tokens)")
        axis.set_ylabel(name)
        axis.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    figure.suptitle(f"nugget2d bench speed — {title}" if title else "nugget2d bench speed")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


def plot_quality(records: list[dict], path: str | Path, title: str = "") -> Path:
    """Each quality metric against the ratio kept, one line per method and context (full KV as a
    flat line); writes ``path``."""
    plt = _pyplot()
    figure, axes = plt.subplots(2, 3, figsize=(16, 8))
    axes.flat[-1].axis("off")  # five panels
    for axis, (key, name) in zip(axes.flat, QUALITY_PANELS):
        have = [r for r in records if r.get(key) is not None]
        lines: dict[str, list[dict]] = defaultdict(list)
        for record in have:
            lines[f"{record['method']} c={record['context']}"].append(record)
        for label, points in sorted(lines.items()):
            points = sorted(points, key=lambda r: r["ratio"])
            if points[0]["method"] == "full":  # a flat line across the axis (visible with one ratio too)
                axis.axhline(points[0][key], linestyle="--", color="black", linewidth=1, label=label)
            else:
                axis.plot([p["ratio"] for p in points], [p[key] for p in points], "o-", label=label, markersize=4)
        axis.set_xlabel("ratio kept")
        axis.set_ylabel(name)
        if key.endswith("ppl") and have:
            axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
        if lines:
            axis.legend(fontsize=7)
        else:
            axis.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axis.transAxes)
    figure.suptitle(f"nugget2d bench quality — {title}" if title else "nugget2d bench quality")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)
