"""An adapter to start a co-training run from: a trained adapter's scorer and LoRA ``A`` matrices with
every LoRA ``B`` matrix zeroed (so the model reads exactly as without the LoRA until it trains) and the
LoRA scaled by ``--alpha``. Used as ``--init-adapter`` by the runs in ``benchmarks/needles/``. Run from
the repository root:

    python training/zero_lora.py runtime/data/adapter /tmp/zero-lora --alpha 8
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

WEIGHTS = "adapter_model.safetensors"
CONFIG = "nugget2d_config.json"


def zero_lora(source: Path, target: Path, alpha: int) -> None:
    """Copy the adapter in ``source`` to ``target`` with its LoRA ``B`` matrices zeroed and ``lora_alpha``
    set to ``alpha``; ``ValueError`` when ``source`` is not an adapter with a LoRA."""
    if not (source / WEIGHTS).is_file() or not (source / CONFIG).is_file():
        raise ValueError(f"{source} holds no adapter with a LoRA ({WEIGHTS} and {CONFIG})")
    if alpha < 1:
        raise ValueError(f"--alpha must be >= 1, got {alpha}")
    shutil.copytree(source, target, dirs_exist_ok=True)
    weights = load_file(str(source / WEIGHTS))
    zeroed = [name for name in weights if "lora_B" in name]
    if not zeroed:
        raise ValueError(f"{source / WEIGHTS} holds no lora_B matrices")
    for name in zeroed:
        weights[name] = weights[name].new_zeros(weights[name].shape)
    save_file(weights, str(target / WEIGHTS))
    config = json.loads((source / CONFIG).read_text())
    config["lora_alpha"] = alpha
    (target / CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a trained adapter directory")
    parser.add_argument("target", type=Path, help="where to write the zero-LoRA copy")
    parser.add_argument("--alpha", type=int, default=8, help="the copy's lora_alpha (default 8)")
    args = parser.parse_args()
    try:
        zero_lora(args.source, args.target, args.alpha)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {args.target}")


if __name__ == "__main__":
    main()
