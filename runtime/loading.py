"""Building a ready ``Nugget2DModel`` from CLI-style choices of base model and adapter."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from nugget2d.compress import Nugget2DConfig, Nugget2DModel

from .models import load_model


def load_nugget2d(
    model: str | None = None,
    adapter: str | None = None,
    config: Nugget2DConfig | None = None,
    attention: str = "sdpa",
) -> tuple[Nugget2DModel, PreTrainedTokenizerBase]:
    """Load the base model (default: the embedded one) and wrap it.

    ``adapter`` is an adapter directory, or None/``"none"`` for a fresh (untrained) scorer and
    zero-initialised LoRA built from ``config``. The result is in eval mode.
    """
    base, tokenizer = load_model(model)
    if adapter in (None, "", "none"):
        nugget_model = Nugget2DModel.from_base(base, config or Nugget2DConfig(), attention=attention)
    else:
        path = Path(adapter)
        if not path.is_dir():
            raise FileNotFoundError(f"adapter directory {adapter} does not exist; pass --adapter none for no adapter")
        nugget_model = Nugget2DModel.from_pretrained(path, base_model=base, attention=attention)
    return nugget_model.eval(), tokenizer
