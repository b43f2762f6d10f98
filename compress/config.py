"""Nugget2D settings: what an adapter directory records in ``nugget2d_config.json``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

CONFIG_NAME = "nugget2d_config.json"

BiasMode = Literal["straight_through", "plain"]
SelectionMode = Literal["topk", "threshold"]
PositionMode = Literal["original", "cache"]
Allocation = Literal["token", "head"]


BIAS_MODES = ("straight_through", "plain")  # how a nugget's score enters attention (see Nugget2DConfig)


@dataclass
class Nugget2DConfig:
    """Hyper-parameters of the method (docs/design.md) plus the base model the adapter belongs to.

    * ``ratio`` — fraction of a segment's tokens kept as nuggets, ``0 < ratio <= 1``.
    * ``scorer_layer`` — λ: the scorer reads the hidden states after this many layers; the encoder
      adapter has no LoRA in those first λ layers so the scorer sees the frozen model's features.
    * ``bias_mode`` — ``straight_through`` adds ``s - stopgrad(s)`` (value 0: the forward pass equals
      the plain model) or ``plain`` adds ``s`` to every attention logit towards a nugget.
    * ``selection`` — ``topk`` keeps ``ceil(n * ratio)`` tokens; ``threshold`` keeps tokens whose score
      exceeds ``threshold`` (streaming). The last token of a segment is always kept.
    * ``positions`` — ``original``: nuggets keep their text positions (paper default, texts inside the
      native window); ``cache``: a token's position is the number of cache entries before it.
    * ``decoder_adapter`` — whether the decoder LoRA reads the nuggets; ``False`` lets the unmodified
      base model read them (docs/design.md: the frozen reader).
    * ``allocation`` — what the scorer scores: ``token`` (one score per token: every layer and head
      keeps the same nuggets) or ``head`` (one score per token, layer and KV head: the budget is
      spread unevenly over layers and heads, docs/design.md). A ``head`` scorer also serves token-level
      caches (the mean of its scores).
    * ``scorer_members`` — 1: one scorer; more: a union of scorers fitted to different text, an entry
      scoring the best of its members' calibrated scores (``nugget2d union``).
    """

    ratio: float = 0.1
    scorer_layer: int = 3
    lora_rank: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj", "o_proj"])
    bias_mode: BiasMode = "straight_through"
    selection: SelectionMode = "topk"
    threshold: float = 0.0
    positions: PositionMode = "original"
    decoder_adapter: bool = False
    allocation: Allocation = "token"
    scorer_members: int = 1
    base_model: str = ""
    base_model_hash: str = ""

    def __post_init__(self) -> None:
        self.lora_targets = list(self.lora_targets)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field and its allowed values."""
        check_ratio(self.ratio)
        if not isinstance(self.scorer_layer, int) or self.scorer_layer < 0:
            raise ValueError(f"scorer_layer must be an integer >= 0, got {self.scorer_layer!r}")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        _check_choice("bias_mode", self.bias_mode, BIAS_MODES)
        _check_choice("selection", self.selection, ("topk", "threshold"))
        _check_choice("positions", self.positions, ("original", "cache"))
        _check_choice("allocation", self.allocation, ("token", "head"))
        if not isinstance(self.scorer_members, int) or self.scorer_members < 1:
            raise ValueError(f"scorer_members must be an integer >= 1, got {self.scorer_members!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Nugget2DConfig:
        """Build from a dict, refusing unknown keys with their names."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown Nugget2D config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        """Write ``nugget2d_config.json`` into ``directory`` and return its path."""
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Nugget2DConfig:
        """Read ``nugget2d_config.json`` from an adapter directory."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ValueError(f"{directory} is not a Nugget2D adapter directory: {CONFIG_NAME} is missing")
        return cls.from_dict(json.loads(path.read_text()))


def check_ratio(ratio: float) -> None:
    """Raise ``ValueError`` unless ``0 < ratio <= 1``."""
    if not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
        raise ValueError(
            f"compression ratio must be in (0, 1] (the fraction of tokens kept, e.g. 0.1 for 10x), got {ratio!r}"
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
