"""A Markdown model card for an adapter directory: what it was trained on, how, and what the run
measured (written beside every checkpoint's adapter as ``README.md``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CARD = "README.md"


def model_card(
    config: dict[str, Any],
    metrics: list[dict[str, Any]],
    tokens_seen: int,
    defaults: dict[str, Any],
    adapter: dict[str, Any],
) -> str:
    """The card's text from a run's config (``asdict(TrainConfig)``), its per-step metrics (every
    record so far, across resumes), the tokens it has seen and the saved adapter's own
    ``nugget2d_config.json`` (its shape: an ``--init-adapter`` run keeps the init adapter's, whatever
    the flags say); ``defaults`` are the config's defaults, so the command shows only the flags that differ."""
    steps = metrics[-1]["step"] if metrics else 0
    head = [m["loss"] for m in metrics[:10]]
    tail = [m["loss"] for m in metrics[-10:]]
    evaluated = [m for m in metrics if "heldout_loss" in m]
    scorer_only = config["objective"] == "scorer"
    lines = [
        "# Nugget2D adapter",
        "",
        f"Base model: `{config.get('model') or 'SmolLM2-135M-Instruct (embedded default)'}`. "
        f"Compression ratio r = {adapter['ratio']}; LoRA rank {adapter['lora_rank']} on the encoder"
        + (" and decoder" if adapter["decoder_adapter"] else " (the unmodified model reads the cache)")
        + f"; scorer on layer {adapter['scorer_layer']}"
        + (f" (a union of {adapter['scorer_members']})" if adapter.get("scorer_members", 1) > 1 else "")
        + f"; allocation `{adapter['allocation']}`, bias mode "
        f"`{adapter['bias_mode']}`, positions `{adapter['positions']}`.",
        "",
        "## Training",
        "",
        f"* Objective: `{config['objective']}`" + (f" ({config['mix']})" if config.get("mix") else ""),
        f"* {_loss_line(config)}",
        f"* Data: {', '.join(Path(p).name for p in config['data'])}",
        f"* Examples: segments of {config['segment_size']} tokens, "
        + (
            "each read again after a repeat instruction (KVzip's importance pass)"
            if scorer_only
            else f"targets of {config['target_size']}"
            + (f", {config['sinks']} sink and {config['recent']} recent tokens kept raw" if config["recent"] else "")
            + (
                f", {config['distractors']} distractor segments before a recall or a question"
                if config.get("distractors", 1) != 1
                else ""
            )
        ),
        f"* Steps: {steps} of {config['max_steps']} (batch {config['batch_size']}), {tokens_seen:,} tokens seen",
        f"* Optimiser: AdamW (0.9, 0.95), lr {config['lr']}"
        + (f" (scorer {config['scorer_lr']})" if config.get("scorer_lr") is not None else "")
        + f", warm-up {config['warmup_steps']}, cosine; "
        f"DeepSpeed `{config['ds_config']}`",
        f"* Command: `{command(config, defaults)}`",
        "",
        "## Measured during training",
        "",
    ]
    if head and tail:
        lines.append(
            f"* Training loss: {sum(head) / len(head):.3f} (first 10 steps) → {sum(tail) / len(tail):.3f} (last 10)"
        )
    if evaluated:
        last = evaluated[-1]
        shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k.startswith(("heldout", "autoencode")))
        lines.append(f"* Held-out at step {last['step']}: {shown}")
    if scorer_only and evaluated:
        first = evaluated[0]
        lines.append(
            f"* Scorer vs importance, step {first['step']} → {evaluated[-1]['step']}: rank correlation "
            f"{first['heldout_rank_corr']:.3f} → {evaluated[-1]['heldout_rank_corr']:.3f}, top-10% recall "
            f"{first['heldout_topk_recall']:.3f} → {evaluated[-1]['heldout_topk_recall']:.3f}"
        )
    return "\n".join(lines) + "\n"


def _loss_line(config: dict[str, Any]) -> str:
    """What the run minimised, in words."""
    if config["objective"] == "scorer":
        allocation = config.get("allocation") or "head"
        unit = "(layer, KV head, token) entry" if allocation == "head" else "token (mean over layers and heads)"
        return (
            f"Loss: the scorer alone (LoRA frozen), allocation `{allocation}`, fitted to the frozen model's "
            f"importance of each {unit} — the max attention it gets from KVzip's repeat queries or the last 32 "
            "context queries (SnapKV) — by ListNet over all entries of an example (KL to softmax of z-scored "
            "log-importance, τ = 1); saved with bias mode `straight_through`: its scores select entries and "
            "never bias attention"
        )
    loss = config.get("loss", "ce")
    kl = "KL(the frozen model reading the full uncompressed text ‖ the model reading the cache) on the target tokens"
    return {
        "ce": "Loss: cross-entropy of the target tokens read over the cache",
        "kl": f"Loss: {kl}",
        "ce+kl": f"Loss: cross-entropy of the target tokens + {kl}",
    }[loss]


def command(config: dict[str, Any], defaults: dict[str, Any]) -> str:
    """The ``nugget2d train`` command line that reproduces ``config`` (flags that differ from the defaults)."""
    parts = ["nugget2d train", "--data", *config["data"]]
    for key, value in config.items():
        if key in ("data", "resume", "stop_at") or value == defaults.get(key) or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        else:  # a list flag (--exclude) takes its values one after another
            parts.extend([flag, *map(str, value if isinstance(value, list) else [value])])
    return " ".join(parts)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (empty if there is none yet)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
