"""Shared fixtures: tiny random decoder models and token batches."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny_llama, tiny_qwen2


@pytest.fixture(params=["llama", "qwen2"])
def tiny_base(request):
    """Each tiny architecture in turn."""
    return tiny_llama() if request.param == "llama" else tiny_qwen2()


@pytest.fixture
def tokens():
    """A fixed batch of random token ids, ``(2, 40)``."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 40), generator=generator)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A local model directory (tiny Llama + word-level tokenizer), as a user would pass to --model."""
    from tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))
