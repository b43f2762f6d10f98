"""Write the training-free nugget2d adapter of an embedded or local model: zero LoRA, zero per-head scorer,
so the observation window alone (the attention of each segment's last 32 queries) chooses what stays.

    python benchmarks/models/training_free_adapter.py --model gemma3-270m --out /tmp/gemma3-training-free

The directory is then an ``--adapter`` for ``nugget2d bench``/``stream``/``serve`` (nothing is trained:
it regenerates identically).
"""

from __future__ import annotations

import argparse

from nugget2d.compress import Nugget2DModel
from nugget2d.runtime.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    base, _ = load_model(args.model)
    print(Nugget2DModel.training_free(base, ratio=args.ratio).save_pretrained(args.out))


if __name__ == "__main__":
    main()
