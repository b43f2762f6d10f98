"""Adapter directories and cache files: round trips and refusals."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from tiny_models import tiny_llama, tiny_qwen2

from nugget2d.compress import Nugget2DConfig, Nugget2DModel, NuggetCache
from nugget2d.compress.hf_compat import returned_cache


def _trained_looking(base) -> Nugget2DModel:
    """A wrapper whose LoRA and scorer weights are non-trivial (as after training)."""
    model = Nugget2DModel.from_base(
        base, Nugget2DConfig(ratio=0.3, scorer_layer=1, bias_mode="plain", decoder_adapter=True)
    ).eval()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def test_save_and_load_reproduce_logits_exactly(tmp_path, tokens):
    model = _trained_looking(tiny_llama())
    with torch.no_grad():
        expected = model(tokens[:, 25:], nuggets=model.compress(tokens[:, :25])).logits
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_model.safetensors",
        "nugget2d_config.json",
        "scorer.safetensors",
    ]
    restored = Nugget2DModel.from_pretrained(tmp_path / "adapter", base_model=tiny_llama()).eval()
    with torch.no_grad():
        got = restored(tokens[:, 25:], nuggets=restored.compress(tokens[:, :25])).logits
    assert torch.equal(got, expected)
    config = json.loads((tmp_path / "adapter" / "nugget2d_config.json").read_text())
    assert config["ratio"] == 0.3 and config["base_model_hash"] == model.fingerprint


def test_loading_onto_another_base_model_is_refused(tmp_path):
    model = _trained_looking(tiny_llama(seed=0))
    model.config.base_model = "tiny-llama-a"
    model.save_pretrained(tmp_path / "adapter")
    other = tiny_llama(seed=1)
    other.name_or_path = "tiny-llama-b"
    with pytest.raises(ValueError, match="tiny-llama-a.*tiny-llama-b"):
        Nugget2DModel.from_pretrained(tmp_path / "adapter", base_model=other)


def test_missing_adapter_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="nugget2d_config.json is missing"):
        Nugget2DModel.from_pretrained(tmp_path, base_model=tiny_llama())
    _trained_looking(tiny_llama()).save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "scorer.safetensors").unlink()
    with pytest.raises(ValueError, match="scorer.safetensors is missing"):
        Nugget2DModel.from_pretrained(tmp_path / "a", base_model=tiny_llama())


def test_cache_file_round_trip(tmp_path, tokens):
    model = _trained_looking(tiny_qwen2())
    with torch.no_grad():
        cache = model.compress(tokens[:, :30])
        expected = model(tokens[:, 30:], nuggets=cache).logits
    cache.save(tmp_path / "doc.safetensors")
    loaded = NuggetCache.load(tmp_path / "doc.safetensors")
    assert loaded.nbytes == cache.nbytes
    assert loaded.nugget_counts().tolist() == cache.nugget_counts().tolist()
    with torch.no_grad():
        assert torch.equal(model(tokens[:, 30:], nuggets=loaded).logits, expected)


def test_cache_from_another_model_is_refused(tmp_path, tokens):
    first = _trained_looking(tiny_llama(seed=0))
    second = _trained_looking(tiny_llama(seed=2))
    with torch.no_grad():
        first.compress(tokens[:, :20]).save(tmp_path / "doc.safetensors")
    cache = NuggetCache.load(tmp_path / "doc.safetensors")
    with pytest.raises(ValueError, match="built by another model"):
        second(tokens[:, 20:], nuggets=cache)
    with pytest.raises(ValueError, match="built by another model"):
        second.compress(tokens[:, 20:], cache=cache)


def test_unreadable_cache_files_say_so(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        NuggetCache.load(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="no nugget cache file"):
        NuggetCache.load(tmp_path / "absent.safetensors")


def test_cache_sizes_and_fork(tokens):
    model = _trained_looking(tiny_llama())
    with torch.no_grad():
        cache = model.compress(tokens[:, :20])
    per_layer = sum(t.numel() * t.element_size() for t in cache.layers[0].tensors().values())
    assert cache.nbytes == per_layer * len(cache.layers)
    keys = cache.layers[0].keys
    assert cache.kv_nbytes() == 2 * keys.numel() * keys.element_size() * len(cache.layers)
    before = cache.get_seq_length()
    with torch.no_grad():
        out = model(tokens[:, 20:], nuggets=cache)
    assert cache.get_seq_length() == before  # forward decodes over a fork
    assert returned_cache(out).get_seq_length() == before + 20


def test_the_shipped_adapter_is_the_default_only_for_its_base_model(tmp_path, tiny_model_dir, monkeypatch):
    from tiny_models import save_tiny_model

    from nugget2d.runtime import loading

    base, _ = loading.load_model(str(tiny_model_dir))
    shipped = Nugget2DModel.from_base(base, Nugget2DConfig(ratio=0.25, scorer_layer=1)).save_pretrained(tmp_path / "a")
    monkeypatch.setattr(loading, "default_adapter_dir", lambda: shipped)
    model, _ = loading.load_nugget2d(str(tiny_model_dir))
    assert model.adapter_source == str(shipped) and model.config.ratio == 0.25
    untrained = [loading.load_nugget2d(str(tiny_model_dir), "none")[0] for _ in range(2)]
    assert untrained[0].adapter_source == "untrained"
    first, second = (model.scorer.state_dict() for model in untrained)  # runs compare: the same random scorer
    assert all(torch.equal(first[name], second[name]) for name in first)
    other = save_tiny_model(tmp_path / "other", initializer_range=0.3)  # another base model
    assert loading.load_nugget2d(str(other))[0].adapter_source == "untrained"
    with pytest.raises(ValueError, match="no default adapter"):
        loading.load_nugget2d(str(other), "default")
    other_base, _ = loading.load_model(str(other))  # an adapter shipped for it beside the default one
    for_other = Nugget2DModel.from_base(other_base, Nugget2DConfig(ratio=0.2, scorer_layer=1))
    for_other.save_pretrained(tmp_path / "adapters" / "other")
    monkeypatch.setattr(loading, "other_adapter_dirs", lambda: [tmp_path / "adapters" / "other"])
    assert loading.load_nugget2d(str(other), "default")[0].adapter_source == str(tmp_path / "adapters" / "other")
    assert loading.load_nugget2d(str(tiny_model_dir))[0].adapter_source == str(shipped)


def test_saving_never_looks_up_a_model_hub(tmp_path, recwarn):
    model = Nugget2DModel.from_base(tiny_llama(), Nugget2DConfig(scorer_layer=1))
    for settings in model.peft_model.peft_config.values():  # a hub-like name, as the default model has
        settings.base_model_name_or_path = "SmolLM2-135M-Instruct"
    model.save_pretrained(tmp_path / "adapter")
    assert not [w for w in recwarn if "remote" in str(w.message) or "config file" in str(w.message)]


def test_a_zero_lora_copy_reads_as_the_base_model_and_keeps_the_scorer(tmp_path, tokens):
    spec = importlib.util.spec_from_file_location("zero_lora", "training/zero_lora.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    _trained_looking(tiny_llama()).save_pretrained(tmp_path / "trained")
    script.zero_lora(tmp_path / "trained", tmp_path / "zero", alpha=8)
    trained = Nugget2DModel.from_pretrained(tmp_path / "trained", base_model=tiny_llama()).eval()
    zero = Nugget2DModel.from_pretrained(tmp_path / "zero", base_model=tiny_llama()).eval()
    assert zero.config.lora_alpha == 8
    scorers = zip(zero.scorer.state_dict().values(), trained.scorer.state_dict().values())
    assert all(torch.equal(a, b) for a, b in scorers)
    with torch.no_grad():
        assert torch.allclose(zero(tokens).logits, tiny_llama()(tokens).logits, atol=1e-5)
        assert not torch.allclose(trained(tokens).logits, tiny_llama()(tokens).logits, atol=1e-5)
    with pytest.raises(ValueError, match="holds no adapter with a LoRA"):
        script.zero_lora(tmp_path / "absent", tmp_path / "x", alpha=8)
