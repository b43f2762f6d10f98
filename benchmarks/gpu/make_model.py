"""A model directory of a model's shape with random weights, and a random per-head adapter with the
shipped adapter's settings: what the GPU benchmarks decode with where the real weights cannot travel
(the device takes at most 64 MiB; SmolLM2-135M is 538 MB in fp32). Decode time depends on the shape,
not the weights; which entries a per-head cache keeps (how uneven its heads are) does, so nugget2d's
figures on such a model are those of a random scorer over random hidden states.

Usage (repository root): python benchmarks/gpu/make_model.py SHAPE_DIR MODEL_OUT ADAPTER_OUT
(SHAPE_DIR: config.json and tokenizer files, as ``benchmarks/gpu/prepare.sh`` copies them)
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from nugget2d.compress import Nugget2DConfig, Nugget2DModel
from nugget2d.runtime.loading import default_adapter_dir


def main(shape_dir: str, model_out: str, adapter_out: str) -> None:
    """Write the random model to ``model_out`` and the random adapter (shipped settings) to ``adapter_out``."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shape_dir), dtype=torch.float32)
    base.save_pretrained(model_out)
    AutoTokenizer.from_pretrained(shape_dir).save_pretrained(model_out)
    config = Nugget2DConfig.load(default_adapter_dir())
    config.base_model, config.base_model_hash = model_out, ""
    Nugget2DModel.from_base(base, config).save_pretrained(adapter_out)
    print(f"random {base.config.model_type} of {sum(p.numel() for p in base.parameters()):,} parameters in {model_out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
