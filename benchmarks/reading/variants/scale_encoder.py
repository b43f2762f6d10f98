"""Copy an adapter directory with its encoder LoRA's update scaled by S (every encoder ``lora_B`` × S).

Usage: python benchmarks/reading/variants/scale_encoder.py ADAPTER_DIR OUT_DIR S
(The shipped adapter gets the same scaling without touching a weight: ``lora_alpha`` 6 with rank 8.)
"""

import shutil
import sys

from safetensors.torch import load_file, save_file


def main(source: str, target: str, scale: str) -> None:
    shutil.copytree(source, target, dirs_exist_ok=True)
    weights = load_file(f"{source}/adapter_model.safetensors")
    for name in weights:
        if name.startswith("encoder.") and "lora_B" in name:
            weights[name] = weights[name] * float(scale)
    save_file(weights, f"{target}/adapter_model.safetensors")


if __name__ == "__main__":
    main(*sys.argv[1:4])
