"""Nugget2DModel: parity with the base model, gradients, trainable parts, batching."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama

from nugget2d.compress import Nugget2DConfig, Nugget2DModel


def _wrap(base, **settings) -> Nugget2DModel:
    config = Nugget2DConfig(**{"ratio": 1.0, "scorer_layer": 1, **settings})
    return Nugget2DModel.from_base(base, config).eval()


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
@pytest.mark.parametrize("positions", ["original", "cache"])
def test_decoding_over_all_nuggets_equals_the_base_model(tiny_base, tokens, backend, positions):
    with torch.no_grad():
        reference = tiny_base(tokens).logits
    model = _wrap(tiny_base, positions=positions)
    model.set_attention(backend)
    with torch.no_grad():
        nuggets = model.compress(tokens[:, :25])
        logits = model(tokens[:, 25:], nuggets=nuggets).logits
    assert nuggets.get_seq_length() == 25
    assert (logits - reference[:, 25:]).abs().max() <= 1e-4


def test_compress_keeps_ceil_n_r_tokens_in_order_with_the_last(tokens):
    model = _wrap(tiny_llama(), ratio=0.1)
    with torch.no_grad():
        cache = model.compress(tokens[:, :31])
    assert cache.nugget_counts().tolist() == [4, 4]
    positions = cache.layers[0].positions
    assert (positions[:, 1:] > positions[:, :-1]).all()
    assert (positions[:, -1] == 30).all()
    assert cache.seen_tokens.tolist() == [31, 31]


def test_plain_bias_moves_logits_and_straight_through_does_not(tokens):
    outputs = {}
    for mode in ["plain", "straight_through"]:
        model = _wrap(tiny_llama(), bias_mode=mode)
        with torch.no_grad():
            model.scorer.net[2].bias.fill_(3.0)  # make every score clearly non-zero
            outputs[mode] = model(tokens[:, 25:], nuggets=model.compress(tokens[:, :25])).logits
    reference = tiny_llama()(tokens).logits[:, 25:]
    assert (outputs["straight_through"] - reference).abs().max() <= 1e-4
    assert (outputs["plain"] - reference).abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["plain", "straight_through"])
def test_scorer_gets_gradient_through_the_bias(tokens, mode):
    model = _wrap(tiny_llama(), ratio=0.5, bias_mode=mode)
    nuggets = model.compress(tokens[:, :20])
    loss = model(tokens[:, 20:], nuggets=nuggets, labels=tokens[:, 20:]).loss
    loss.backward()
    grads = [p.grad for p in model.scorer.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_only_lora_and_scorer_train(tokens):
    reader_frozen = _wrap(tiny_llama(), ratio=0.5)
    assert not any(".decoder." in n for n, p in reader_frozen.named_parameters() if p.requires_grad)
    model = _wrap(tiny_llama(), ratio=0.5, decoder_adapter=True)
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert names, "nothing is trainable"
    assert all("lora_" in name or name.startswith("scorer.") for name in names)
    assert any(".encoder." in name for name in names) and any(".decoder." in name for name in names)
    assert any(name.startswith("scorer.") for name in names)
    # no encoder LoRA in the first λ layers; the decoder has LoRA everywhere
    assert not any("layers.0." in name and ".encoder." in name for name in names)
    assert any("layers.0." in name and ".decoder." in name for name in names)
    model.train()
    nuggets = model.compress(tokens[:, :20])
    model(tokens[:, 20:], nuggets=nuggets, labels=tokens[:, 20:]).loss.backward()
    assert all(p.grad is None for name, p in model.named_parameters() if name not in names)


def test_encoder_and_decoder_adapters_both_receive_gradient(tokens):
    model = _wrap(tiny_llama(), ratio=0.5, decoder_adapter=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    nuggets = model.compress(tokens[:, :20])
    model(tokens[:, 20:], nuggets=nuggets, labels=tokens[:, 20:]).loss.backward()
    # The encoder's nuggets are keys/values, so its v_proj LoRA learns in every layer (its last
    # layer's q/o projections feed no kept state and rightly get none).
    for adapter, projection in (("encoder", "v_proj"), ("decoder", "")):
        grads = [
            p.grad
            for name, p in model.named_parameters()
            if f".{adapter}." in name and "lora_A" in name and projection in name
        ]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), adapter


def test_an_all_zero_encoder_is_skipped_without_gradients_and_changes_nothing(tokens):
    model = _wrap(tiny_llama(), ratio=0.5)
    encoder_layer = next(m for m in model.modules() if hasattr(m, "lora_B") and "encoder" in m.lora_B)
    with torch.no_grad():
        skipped = model.encode(tokens).layers[1]
        assert encoder_layer.active_adapters == []  # the zero LoRA did not run
    ran = model.encode(tokens).layers[1]  # with gradients it runs (training needs its gradient)
    assert encoder_layer.active_adapters == ["encoder"]
    assert torch.equal(skipped.keys, ran.keys) and torch.equal(skipped.values, ran.values)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "encoder.weight" in name and "lora_B" in name:
                p.normal_(std=0.02)
        trained = model.encode(tokens).layers[1]
        assert encoder_layer.active_adapters == ["encoder"]
    assert (trained.values - ran.values).abs().max() > 1e-4


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_rows_one_by_one(side):
    model = _wrap(tiny_llama(), ratio=0.3)
    generator = torch.Generator().manual_seed(3)
    texts = [torch.randint(0, 97, (n,), generator=generator) for n in (17, 11)]
    questions = [torch.randint(0, 97, (n,), generator=generator) for n in (4, 6)]

    def pad(rows):
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            ids[i, span], mask[i, span] = row, 1
        return ids, mask

    with torch.no_grad():
        text_ids, text_mask = pad(texts)
        question_ids, question_mask = pad(questions)
        batch_cache = model.compress(text_ids, text_mask)
        batch_logits = model(question_ids, nuggets=batch_cache, attention_mask=question_mask).logits
        for i in range(2):
            cache = model.compress(texts[i][None])
            logits = model(questions[i][None], nuggets=cache).logits[0]
            real = question_mask[i].bool()
            assert (batch_logits[i][real] - logits).abs().max() <= 1e-4
            assert int(batch_cache.nugget_counts()[i]) == cache.get_seq_length()
