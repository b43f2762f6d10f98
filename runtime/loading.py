"""Building a ready ``Nugget2DModel`` from CLI-style choices of base model and adapter."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nugget2d.compress import Nugget2DConfig, Nugget2DModel
from nugget2d.compress.model import model_fingerprint

from .models import load_model

UNTRAINED_SEED = 0  # ``--adapter none``: the untrained scorer's weights, fixed so runs compare
DEFAULT_ADAPTER = "adapter"  # runtime/data/adapter: the trained adapter for the embedded default model
OTHER_ADAPTERS = "adapters"  # runtime/data/adapters/<name>: adapters shipped for other base models


def default_adapter_dir() -> Path | None:
    """The adapter shipped inside the package for the embedded default model (with its model card), or
    None if this build has none."""
    path = Path(str(resources.files("nugget2d.runtime").joinpath("data", DEFAULT_ADAPTER)))
    return path if (path / "nugget2d_config.json").is_file() else None


def other_adapter_dirs() -> list[Path]:
    """The adapters shipped for other base models (``runtime/data/adapters/*``, each with its card)."""
    root = Path(str(resources.files("nugget2d.runtime").joinpath("data", OTHER_ADAPTERS)))
    return sorted(p for p in root.glob("*") if (p / "nugget2d_config.json").is_file()) if root.is_dir() else []


def default_adapter_for(base: PreTrainedModel) -> Path | None:
    """The shipped adapter trained for ``base`` (same fingerprint), else None."""
    fingerprint = model_fingerprint(base)
    shipped = [default_adapter_dir(), *other_adapter_dirs()]
    return next((p for p in shipped if p is not None and Nugget2DConfig.load(p).base_model_hash == fingerprint), None)


def load_nugget2d(
    model: str | None = None,
    adapter: str | None = None,
    config: Nugget2DConfig | None = None,
    attention: str = "sdpa",
    ratio: float | None = None,
) -> tuple[Nugget2DModel, PreTrainedTokenizerBase]:
    """Load the base model (default: the embedded one) and wrap it.

    ``adapter`` is an adapter directory; None (or ``"default"``) takes the adapter shipped in the
    package when it was trained for this base model; ``"none"`` builds a fresh (untrained) scorer and
    zero-initialised LoRA from ``config`` (default: the defaults, at ``ratio`` when given; seeded: the same
    weights in every run); a trained adapter brings its own config. The result is in
    eval mode; ``model.adapter_source`` says which adapter it carries.
    """
    base, tokenizer = load_model(model)
    if adapter in (None, "", "default"):
        default = default_adapter_for(base)
        if default is None and adapter == "default":
            raise ValueError("no default adapter is shipped for this base model; pass --adapter none or a directory")
        adapter = str(default) if default is not None else "none"
    if adapter == "none":
        with torch.random.fork_rng(devices=[]):  # the same untrained scorer in every run, the caller's RNG untouched
            torch.manual_seed(UNTRAINED_SEED)
            config = config or Nugget2DConfig(**({} if ratio is None else {"ratio": ratio}))
            nugget_model = Nugget2DModel.from_base(base, config, attention=attention)
    else:
        path = Path(adapter)
        if not path.is_dir():
            raise FileNotFoundError(f"adapter directory {adapter} does not exist; pass --adapter none for no adapter")
        nugget_model = Nugget2DModel.from_pretrained(path, base_model=base, attention=attention)
    return nugget_model.eval(), tokenizer
