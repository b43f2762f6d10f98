"""Shared fixtures: tiny random decoder models and token batches."""

from __future__ import annotations

import pytest
import torch
from tiny_models import SENTENCES, VOCAB, save_tiny_model, tiny_llama, tiny_qwen2


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
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def trainable_model_dir(tmp_path_factory):
    """A tiny model whose (frozen) output head is large enough for a loss to be driven down."""
    return save_tiny_model(tmp_path_factory.mktemp("trainable"), initializer_range=0.3)


@pytest.fixture
def corpus(tmp_path):
    """A directory with one small text file of :data:`SENTENCES`, as ``--data`` takes it."""
    path = tmp_path / "corpus" / "few.txt"
    path.parent.mkdir()
    path.write_text(SENTENCES * 8)
    return path.parent


@pytest.fixture
def asked_lookbacks(monkeypatch) -> list:
    """The :class:`~nugget2d.runtime.lookback.LookBack` of every question asked with look-back in the test,
    in order (the questions are answered as usual)."""
    from nugget2d.runtime import session as session_module

    asked: list = []
    real_ask = session_module.ask_looking_back

    def watched(session, prompt, settings, scoring, look, *rest):
        asked.append(look)
        return real_ask(session, prompt, settings, scoring, look, *rest)

    monkeypatch.setattr(session_module, "ask_looking_back", watched)
    return asked
