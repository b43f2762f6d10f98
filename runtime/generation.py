"""The one generation loop: decode tokens over a nugget cache (CLI, server and jobs all call it)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from nugget2d.compress import Nugget2DModel, NuggetCache


@dataclass
class GenerationSettings:
    """How to pick the next tokens: greedy when ``temperature`` is 0."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@torch.no_grad()
def generate_tokens(
    model: Nugget2DModel, cache: NuggetCache, prompt_ids: torch.Tensor, settings: GenerationSettings
) -> Iterator[int]:
    """Yield new token ids for one row, reading ``cache`` (left unchanged) then ``prompt_ids``.

    Stops after ``max_new_tokens`` or at an EOS id (not yielded).
    """
    generator = None
    if settings.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(settings.seed)
    state, step_ids = cache, torch.as_tensor(prompt_ids, device=model.device).reshape(1, -1)
    for _ in range(settings.max_new_tokens):
        out = model(step_ids, nuggets=state)
        logits = out.logits[0, -1].float()
        if settings.temperature > 0:
            probs = torch.softmax(logits / settings.temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        else:
            token = int(logits.argmax())
        if token in settings.eos_token_ids:
            return
        yield token
        state, step_ids = out.past_key_values, torch.tensor([[token]], device=model.device)


class TextDeltas:
    """Turns a stream of token ids into text pieces, holding back bytes of an unfinished character."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        """Add one token; return the new complete text since the last call (may be empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return ""
        delta, self.emitted = text[self.emitted :], len(text)
        return delta

    def text(self) -> str:
        """Everything decoded so far."""
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)
