"""The learning rate at every step of ``cosine_with_warmup``: the formula training has always used, and
how it stands to ``transformers.get_cosine_schedule_with_warmup`` (why training does not use that one)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from nugget2d.runtime.train import cosine_with_warmup

LR = 1e-4
CONFIGS = [(0, 10), (1, 10), (3, 10), (10, 100), (100, 1000)]  # (warm-up steps, max steps)


def rates(make, steps: int) -> list[float]:
    """The scheduler's learning rate before the first step and after each of ``steps`` steps."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = make(optimizer)
    seen = [scheduler.get_last_lr()[0]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        seen.append(scheduler.get_last_lr()[0])
    return seen


def formula(step: int, warmup: int, total: int) -> float:
    """The rate at ``step`` as training computes it: ``(step + 1) / warmup`` ramp, then half a cosine to 0."""
    if step < warmup:
        return LR * ((step + 1) / max(1, warmup))
    return LR * (0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))))


@pytest.mark.parametrize(("warmup", "total"), CONFIGS)
def test_every_step_follows_the_formula_exactly(warmup, total):
    assert rates(lambda o: cosine_with_warmup(o, warmup, total), total) == [
        formula(step, warmup, total) for step in range(total + 1)
    ]


@pytest.mark.parametrize(("warmup", "total"), CONFIGS)
def test_transformers_schedule_is_one_step_behind_during_warmup_and_equal_after(warmup, total):
    ours = rates(lambda o: cosine_with_warmup(o, warmup, total), total)
    theirs = rates(lambda o: get_cosine_schedule_with_warmup(o, warmup, total), total)
    assert theirs[warmup:] == ours[warmup:]
    if warmup:
        assert theirs[0] == 0.0 and ours[0] == formula(0, warmup, total) > 0
        assert theirs[1 : warmup + 1] == ours[:warmup]
