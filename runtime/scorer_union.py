"""``nugget2d union``: join the scorers of several adapters into one that keeps what any of them ranks
high (:class:`~nugget2d.compress.scorer.UnionScorer`), calibrated on a text; the LoRA and settings are
the first adapter's. Why: a scorer fitted on books keeps what continues text, one fitted on planted
facts keeps single needles; neither alone does both (``benchmarks/needles/``)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import torch
from safetensors.torch import load_file

from nugget2d.compress import Nugget2DConfig, Nugget2DModel
from nugget2d.compress.model import SCORER_WEIGHTS
from nugget2d.compress.scorer import UnionScorer

from .models import load_model

RECORD = "scorer_union.json"  # beside the adapter: what the union was built from
CALIBRATION_TOKENS = 2048
MIN_CALIBRATION_TOKENS = 64  # fewer give a mean and spread too noisy to put members on one scale


def member_states(directory: Path, members: int) -> list[dict[str, torch.Tensor]]:
    """The scorer weights an adapter directory holds, one state per scorer (a union of ``members``, as its
    config says, gives each member)."""
    path = directory / SCORER_WEIGHTS
    if not path.is_file():
        raise ValueError(f"adapter directory {directory} is incomplete: {SCORER_WEIGHTS} is missing")
    state = load_file(str(path))
    if members == 1:
        return [state]
    return [
        {key[len(f"members.{i}.") :]: value for key, value in state.items() if key.startswith(f"members.{i}.")}
        for i in range(members)
    ]


def check_joinable(first: Nugget2DConfig, other: Nugget2DConfig, name: str) -> None:
    """``ValueError`` unless ``other``'s scorer reads and scores as ``first``'s (same base model, scorer layer
    and allocation)."""
    for field in ("base_model_hash", "scorer_layer", "allocation"):
        if getattr(first, field) != getattr(other, field):
            raise ValueError(
                f"adapter {name} has {field} {getattr(other, field)!r} where the first has {getattr(first, field)!r}; "
                "only scorers of the same base model, scorer layer and allocation can be joined"
            )


def calibration_ids(tokenizer, path: Path, tokens: int) -> torch.Tensor:
    """The first ``tokens`` token ids of the text file at ``path`` ``(1, n)``; ``ValueError`` when it
    holds fewer than :data:`MIN_CALIBRATION_TOKENS`."""
    if not path.is_file():
        raise FileNotFoundError(f"calibration text {path} does not exist; pass a plain UTF-8 text file")
    ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"), return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < MIN_CALIBRATION_TOKENS:
        raise ValueError(
            f"calibration text {path} has {ids.shape[1]} tokens; give one of at least {MIN_CALIBRATION_TOKENS}"
        )
    return ids


def join_scorers(
    adapters: list[Path],
    calibration: Path,
    output: Path,
    model: str | None = None,
    tokens: int = CALIBRATION_TOKENS,
    command: str | None = None,
) -> Path:
    """Write to ``output`` the first adapter with a union of every adapter's scorers (a union's members
    count one by one), calibrated on the first ``tokens`` tokens of ``calibration``, and ``scorer_union.json``
    recording the sources, the calibration, each member's mean and spread and the ``command`` that made
    it. Checks every input before writing anything."""
    if len(adapters) < 2:
        raise ValueError("give at least two adapter directories to join")
    if tokens < MIN_CALIBRATION_TOKENS:
        raise ValueError(f"--calibration-tokens must be >= {MIN_CALIBRATION_TOKENS}, got {tokens}")
    configs = [Nugget2DConfig.load(directory) for directory in adapters]
    for directory, config in zip(adapters[1:], configs[1:]):
        check_joinable(configs[0], config, str(directory))
    states = [
        state
        for directory, config in zip(adapters, configs)
        for state in member_states(directory, config.scorer_members)
    ]
    base, tokenizer = load_model(model)
    nugget = Nugget2DModel.from_pretrained(adapters[0], base_model=base)
    ids = calibration_ids(tokenizer, calibration, tokens).to(nugget.device)
    union = UnionScorer(base.config.hidden_size, nugget.scorer.heads, len(states)).to(nugget.device)
    for member, state in zip(union.members, states):
        member.load_state_dict(state)
    with torch.no_grad():
        nugget.use_adapter(None)  # the scorer reads layer λ, which no encoder LoRA touches
        hidden = nugget.base(input_ids=ids, output_hidden_states=True).hidden_states[nugget.config.scorer_layer]
    union.calibrate(hidden)
    nugget.scorer = union
    nugget.config.scorer_members = len(states)
    nugget.save_pretrained(output)
    record = {
        "command": command,
        "adapters": [str(directory) for directory in adapters],
        "calibration": {"text": calibration.name, "tokens": int(ids.shape[1])},
        "members": [{"mean": float(c), "spread": float(s)} for c, s in zip(union.center, union.spread)],
    }
    (output / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``union`` subcommand's flags."""
    parser.add_argument("adapters", nargs="+", type=Path, help="adapter directories; the first gives LoRA and settings")
    parser.add_argument("--calibrate", type=Path, required=True, help="text whose first tokens calibrate the scorers")
    parser.add_argument("--calibration-tokens", type=int, default=CALIBRATION_TOKENS, help="tokens of it to read")
    parser.add_argument("--output", type=Path, required=True, help="adapter directory to write (may be the first)")
    parser.add_argument("--model", default=None, help="base model directory (default: the embedded SmolLM2-135M)")


def run(args: argparse.Namespace) -> int:
    """Join the scorers and say where the adapter went."""
    words = [*map(str, args.adapters), "--calibrate", str(args.calibrate), "--output", str(args.output)]
    if args.calibration_tokens != CALIBRATION_TOKENS:
        words += ["--calibration-tokens", str(args.calibration_tokens)]
    words += ["--model", args.model] if args.model else []
    command = "nugget2d union " + shlex.join(words)
    output = join_scorers(args.adapters, args.calibrate, args.output, args.model, args.calibration_tokens, command)
    print(f"wrote {output} (scorer: a union of {Nugget2DConfig.load(output).scorer_members}; {output / RECORD})")
    return 0
