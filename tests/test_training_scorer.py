"""The scorer objective (issue 11) and the KL loss (docs/design.md): KV importance from the frozen
model, the ranking loss and its metrics, training the scorer alone, and KL to the full context."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import _config
from test_training_resume import assert_same_final_state
from tiny_models import SENTENCES, tiny_llama, tiny_tokenizer

from nugget2d.compress import Nugget2DConfig, Nugget2DModel
from nugget2d.runtime.checkpoints import config_differences
from nugget2d.runtime.importance import kv_importance
from nugget2d.runtime.objectives import (
    NuggetObjective,
    listnet_loss,
    rank_correlation,
    standardized_log,
    topk_recall,
)
from nugget2d.runtime.train import TrainConfig, train_loop
from nugget2d.runtime.train_data import Shape, build_examples, collate


def _padded_batch(generator_seed: int = 3):
    """Two contexts (40 and 29 real tokens), each followed by a 3-token instruction and its copy."""
    generator = torch.Generator().manual_seed(generator_seed)
    context = torch.randint(3, 90, (2, 40), generator=generator)
    context_mask = torch.ones(2, 40, dtype=torch.long)
    context_mask[1, 29:] = 0
    repeat = torch.cat([torch.tensor([[5, 6, 7]] * 2), context], dim=1)
    repeat_mask = torch.cat([torch.ones(2, 3, dtype=torch.long), context_mask], dim=1)
    return context, context_mask, repeat, repeat_mask


def test_importance_is_the_max_attention_from_repeat_and_window_queries():
    """Against HF's own eager attention weights, row by row without padding: the max over the query
    heads of each KV group and over the repeat queries (and the last `window` context queries, for
    the keys before them); chunking and padding change nothing."""
    torch.manual_seed(0)
    config = Nugget2DConfig(scorer_layer=1, lora_rank=4, allocation="head", positions="cache")
    model = Nugget2DModel.from_base(tiny_llama(), config)
    context, context_mask, repeat, repeat_mask = _padded_batch()
    found = kv_importance(model, context, context_mask, repeat, repeat_mask, window=8, chunk=7, features_layer=1)
    assert found.scores.shape == (2, 4, 2, 40) and found.features.shape == (2, 40, 64)
    assert bool((found.scores >= 0).all()) and bool((found.scores[1, ..., 29:] == 0).all())
    whole = kv_importance(model, context, context_mask, repeat, repeat_mask, window=8, chunk=1000)
    torch.testing.assert_close(whole.scores, found.scores, atol=1e-6, rtol=0)  # chunking changes nothing

    reference = tiny_llama()
    reference.set_attn_implementation("eager")
    for row in range(2):
        length = int(context_mask[row].sum())
        text = torch.cat([context[row, :length], repeat[row, :3], context[row, :length]])[None]
        with torch.no_grad():
            out = reference(text, output_attentions=True, output_hidden_states=True)
        for layer, weights in enumerate(out.attentions):
            weights = weights[0]  # (query heads, queries, keys)
            expected = weights[:, length:, :length].amax(dim=1)  # every repeat query, every context key
            window = weights[:, length - 8 : length, : length - 8].amax(dim=1)  # the window, keys before it
            expected[:, : length - 8] = torch.maximum(expected[:, : length - 8], window)
            expected = expected.view(2, 2, length).amax(dim=1)  # the query heads of each KV head
            torch.testing.assert_close(found.scores[row, layer, :, :length], expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(found.features[row, :length], out.hidden_states[1][0, :length], atol=1e-5, rtol=0)


def _pointer_model() -> Nugget2DModel:
    """A model whose every query looks at one token: token `the` at layers 0-1 through KV head 0 and
    token `river` through KV head 1; swapped at layers 2-3 (no rotation on the dimension used)."""
    tokenizer = tiny_tokenizer()
    first, second = tokenizer.convert_tokens_to_ids(["the", "river"])
    base = tiny_llama(rope_parameters={"rope_type": "default", "rope_theta": 1e16})
    with torch.no_grad():
        base.model.embed_tokens.weight.zero_()
        base.model.embed_tokens.weight[:, 0] = 1.0  # every token: a common direction
        base.model.embed_tokens.weight[first, 1] = 1.0
        base.model.embed_tokens.weight[second, 2] = 1.0
        for index, layer in enumerate(base.model.layers):
            attention = layer.self_attn
            attention.q_proj.weight.zero_()
            attention.k_proj.weight.zero_()
            attention.o_proj.weight.zero_()  # the residual stream stays the embeddings
            layer.mlp.down_proj.weight.zero_()
            for head in range(4):
                attention.q_proj.weight[head * 16 + 7, 0] = 1.0
            pointers = (1, 2) if index < 2 else (2, 1)
            for kv_head, feature in enumerate(pointers):
                attention.k_proj.weight[kv_head * 16 + 7, feature] = 2.0
    return Nugget2DModel.from_base(base, Nugget2DConfig(scorer_layer=1, lora_rank=4))


def test_importance_points_at_the_token_the_queries_look_for():
    tokenizer = tiny_tokenizer()
    model = _pointer_model()
    words = [
        "a blue book and the old door . he had an old river day .".split(),
        "a blue river . she had the book".split(),
    ]
    rows = [tokenizer.convert_tokens_to_ids(w) for w in words]
    width = max(map(len, rows))
    context = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    context_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    instruction = torch.tensor([[4, 5]] * 2)
    repeat, repeat_mask = (
        torch.cat([instruction, context], 1),
        torch.cat([torch.ones_like(instruction), context_mask], 1),
    )
    found = kv_importance(model, context, context_mask, repeat, repeat_mask, window=4, chunk=5).scores
    for row, w in enumerate(words):
        the, river = w.index("the"), w.index("river")
        for layer in range(4):
            heads = (the, river) if layer < 2 else (river, the)
            assert found[row, layer].argmax(dim=-1).tolist() == list(heads), (row, layer)
            assert float(found[row, layer].max()) > 0.9
        assert bool((found[row, ..., len(w) :] == 0).all())


def test_ranking_metrics():
    generator = torch.Generator().manual_seed(0)
    importance = torch.rand(3, 200, generator=generator) ** 4
    valid = torch.ones(3, 200, dtype=torch.bool)
    valid[2, 150:] = False
    assert torch.allclose(rank_correlation(importance, importance, valid), torch.ones(3))
    assert torch.allclose(rank_correlation(-importance, importance, valid), -torch.ones(3))
    noisy = importance + torch.rand(3, 200, generator=generator)
    correlation = rank_correlation(noisy, importance, valid)
    assert bool(((correlation >= -1) & (correlation <= 1)).all()) and 0 < float(correlation.mean()) < 1
    assert topk_recall(importance, importance, valid).tolist() == [1.0, 1.0, 1.0]
    assert float(topk_recall(-importance, importance, valid).max()) == 0.0
    # ListNet: zero at the targets' own logits, positive elsewhere; padding changes nothing
    perfect = standardized_log(importance, valid)
    assert float(listnet_loss(perfect, importance, valid)) == pytest.approx(0.0, abs=1e-5)
    assert float(listnet_loss(torch.zeros(3, 200), importance, valid)) > 0.1
    shifted = perfect.clone()
    shifted[2, 150:] = 1e3
    assert float(listnet_loss(shifted, importance, valid)) == pytest.approx(0.0, abs=1e-5)
    assert float(rank_correlation(shifted, importance, valid)[2]) == pytest.approx(1.0)


def test_the_scorer_trains_alone_and_saves_a_per_head_selection_adapter(tmp_path, tiny_model_dir, corpus):
    """From an adapter with trained LoRA and a token scorer: a fresh per-head scorer learns the
    ranking (its loss falls) while the LoRA weights stay exactly as loaded."""
    first = train_loop(_config(tiny_model_dir, corpus, tmp_path / "cache", max_steps=2, save_every=2))
    assert first
    init = tmp_path / "cache" / "checkpoint-2" / "adapter"
    run = tmp_path / "scorer"
    config = _config(
        tiny_model_dir,
        corpus,
        run,
        objective="scorer",
        decoder_adapter=False,
        init_adapter=str(init),
        max_steps=24,
        save_every=12,
        eval_every=12,
        eval_fraction=0.2,
        lr=3e-2,
    )
    metrics = train_loop(config)
    losses = [m["loss"] for m in metrics]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.01, losses
    evaluated = [m for m in metrics if "heldout_rank_corr" in m]
    assert [m["step"] for m in evaluated] == [12, 24]
    for m in evaluated:
        assert -1 <= m["heldout_rank_corr"] <= 1 and 0 <= m["heldout_topk_recall"] <= 1
        assert "heldout_ppl" not in m
    adapter = run / "checkpoint-24" / "adapter"
    saved = json.loads((adapter / "nugget2d_config.json").read_text())
    assert saved["allocation"] == "head" and saved["bias_mode"] == "straight_through"
    restored = Nugget2DModel.from_pretrained(adapter, base_model=tiny_llama())
    assert restored.config.allocation == "head" and restored.scorer.heads == (4, 2)
    before, after = (
        load_file(str(init / "adapter_model.safetensors")),
        load_file(str(adapter / "adapter_model.safetensors")),
    )
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any(float(v.abs().sum()) > 0 for k, v in before.items() if "lora_B" in k)  # the init LoRA was trained
    card = (adapter / "README.md").read_text()
    assert "ListNet" in card and "rank correlation" in card

    # the encoder then trains from this scorer: its scores keep selecting, per head, and never bias attention
    for bias_mode, expected in ((None, "straight_through"), ("plain", "plain")):
        out = tmp_path / f"encoder-{bias_mode}"
        train_loop(
            _config(
                tiny_model_dir,
                corpus,
                out,
                max_steps=1,
                save_every=1,
                init_adapter=str(adapter),
                bias_mode=bias_mode,
                lora_rank=16,  # the init adapter's shape wins; the card must say so
            )
        )
        saved = json.loads((out / "checkpoint-1" / "adapter" / "nugget2d_config.json").read_text())
        assert (saved["bias_mode"], saved["allocation"]) == (expected, "head")
        card = (out / "checkpoint-1" / "adapter" / "README.md").read_text()
        assert f"LoRA rank {saved['lora_rank']} " in card and saved["lora_rank"] != 16
        assert f"bias mode `{expected}`" in card
    with pytest.raises(ValueError, match="drop --bias-mode plain"):
        _config(tiny_model_dir, corpus, tmp_path / "x", objective="scorer", decoder_adapter=False, bias_mode="plain")


def test_a_resumed_scorer_run_equals_an_uninterrupted_one(tmp_path, tiny_model_dir, corpus):
    settings = dict(objective="scorer", decoder_adapter=False, max_steps=4, save_every=2, lr=1e-2)
    whole = train_loop(_config(tiny_model_dir, corpus, tmp_path / "a", **settings))
    train_loop(_config(tiny_model_dir, corpus, tmp_path / "b", stop_at=2, **settings))
    resumed = train_loop(_config(tiny_model_dir, corpus, tmp_path / "b", resume=True, **settings))
    assert [m["step"] for m in resumed] == [3, 4]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in whole[2:]]  # bit for bit
    assert_same_final_state(tmp_path / "a" / "checkpoint-4", tmp_path / "b" / "checkpoint-4")
    assert resumed[-1]["tokens_seen"] == whole[-1]["tokens_seen"]


def test_scorer_examples_and_flags(tmp_path, corpus):
    tokenizer = tiny_tokenizer()
    examples = build_examples([corpus], tokenizer, "scorer", Shape(16, 5))
    assert examples and all(e.context == e.target and e.prompt == examples[0].prompt for e in examples)
    assert "." in tokenizer.convert_ids_to_tokens(list(examples[0].prompt))  # the instruction
    data = [str(corpus)]
    with pytest.raises(ValueError, match="--loss kl applies to the cache objectives"):
        TrainConfig(data=data, objective="scorer", loss="kl")
    with pytest.raises(ValueError, match="drop --decoder-adapter"):
        TrainConfig(data=data, objective="scorer", decoder_adapter=True)
    with pytest.raises(ValueError, match="--loss must be one of"):
        TrainConfig(data=data, loss="mse")
    with pytest.raises(ValueError, match="--allocation must be"):
        TrainConfig(data=data, allocation="layer")
    with pytest.raises(ValueError, match="cannot include scorer"):
        build_examples([corpus], tokenizer, "mix", Shape(16, 5), {"continue": 1.0, "scorer": 1.0})


@pytest.mark.parametrize("positions", ["original", "cache"])
def test_the_kl_is_zero_when_the_reader_sees_the_whole_context(tmp_path, positions):
    """Every token kept, zero LoRA, a bias worth 0: the cache holds the full context's K/V, so the
    reader's distribution is the teacher's; a plain (non-zero) score bias makes them differ."""
    path = tmp_path / "book.txt"
    path.write_text(SENTENCES * 6)
    tokenizer = tiny_tokenizer()
    examples = build_examples([path], tokenizer, "continue", Shape(segment=16, target=5, recent=4, sinks=2))
    shorter = dataclasses.replace(examples[1], context=examples[1].context[3:], recent=examples[1].recent[1:])
    batch = collate([examples[0], shorter], pad_id=0)  # rows of different lengths: padding inside the text
    values = {}
    for ratio, bias_mode in ((1.0, "straight_through"), (1.0, "plain"), (0.5, "straight_through")):
        torch.manual_seed(0)
        config = Nugget2DConfig(ratio=ratio, scorer_layer=1, lora_rank=4, bias_mode=bias_mode, positions=positions)
        model = Nugget2DModel.from_base(tiny_llama(initializer_range=0.3), config)
        with torch.no_grad():
            model.scorer.net[2].bias.fill_(2.0)  # nuggets' score 2: a plain bias shifts attention to them
        values[ratio, bias_mode] = NuggetObjective(model, "ce+kl").measure(**batch)
    same = values[1.0, "straight_through"]
    assert abs(same["kl"]) < 1e-5  # (a KL is >= 0 up to float rounding)
    assert values[1.0, "plain"]["kl"] > 1e-3 and values[0.5, "straight_through"]["kl"] > 1e-3
    for parts in values.values():
        assert parts["loss"] == pytest.approx(parts["ce"] + parts["kl"], rel=1e-6)


def test_training_with_the_kl_loss_lowers_it(tmp_path, trainable_model_dir, corpus):
    config = _config(trainable_model_dir, corpus, tmp_path / "kl", loss="kl", max_steps=16, eval_every=16)
    metrics = train_loop(config)
    losses = [m["loss"] for m in metrics]
    assert all(loss >= 0 for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    last = metrics[-1]
    assert {"heldout_kl", "heldout_ce", "heldout_ppl"} <= set(last)
    assert last["heldout_loss"] == pytest.approx(last["heldout_kl"])
    assert last["heldout_ppl"] == pytest.approx(math.exp(last["heldout_ce"]))
    card = (tmp_path / "kl" / "checkpoint-16" / "adapter" / "README.md").read_text()
    assert "KL(the frozen model reading the full uncompressed text" in card


def test_freeze_scorer_trains_the_lora_only(tmp_path, tiny_model_dir, corpus):
    """With --freeze-scorer a cache objective moves the LoRA and leaves the init adapter's scorer
    byte for byte; without an init adapter, or with --objective scorer, it is refused."""
    train_loop(_config(tiny_model_dir, corpus, tmp_path / "init", max_steps=1, save_every=1))
    init = tmp_path / "init" / "checkpoint-1" / "adapter"
    out = tmp_path / "frozen"
    frozen = dict(max_steps=2, save_every=2, init_adapter=str(init), freeze_scorer=True)
    train_loop(_config(tiny_model_dir, corpus, out, **frozen))
    adapter = out / "checkpoint-2" / "adapter"
    before, after = load_file(str(init / "scorer.safetensors")), load_file(str(adapter / "scorer.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    lora_before = load_file(str(init / "adapter_model.safetensors"))
    lora_after = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)
    scorer_run = {"freeze_scorer": True, "objective": "scorer", "init_adapter": str(init)}
    for overrides in ({"freeze_scorer": True}, scorer_run):
        with pytest.raises(ValueError, match="--freeze-scorer keeps the --init-adapter's scorer"):
            _config(tiny_model_dir, corpus, tmp_path / "x", decoder_adapter=False, **overrides)


def _largest_change(before: Path, after: Path) -> float:
    """The largest absolute change of any weight between two safetensors files."""
    old, new = load_file(str(before)), load_file(str(after))
    return max(float((old[k] - new[k]).abs().max()) for k in old)


def test_scorer_lr_trains_the_scorer_at_its_own_rate_and_resumes_exactly(tmp_path, tiny_model_dir, corpus):
    """--scorer-lr puts the scorer in its own optimizer group: it moves, by at most a few steps of
    its own rate while the LoRA moves at --lr; a run stopped and resumed equals one that was not;
    a rate <= 0, or with --freeze-scorer or --objective scorer, is refused."""
    train_loop(_config(tiny_model_dir, corpus, tmp_path / "init", max_steps=1, save_every=1))
    init = tmp_path / "init" / "checkpoint-1" / "adapter"
    run = dict(max_steps=4, save_every=2, init_adapter=str(init), scorer_lr=1e-6, lr=1e-2)
    train_loop(_config(tiny_model_dir, corpus, tmp_path / "whole", **run))
    train_loop(_config(tiny_model_dir, corpus, tmp_path / "parts", stop_at=2, **run))
    resumed = train_loop(_config(tiny_model_dir, corpus, tmp_path / "parts", resume=True, **run))
    assert [m["step"] for m in resumed] == [3, 4]
    assert_same_final_state(tmp_path / "whole" / "checkpoint-4", tmp_path / "parts" / "checkpoint-4")
    adapter = tmp_path / "whole" / "checkpoint-4" / "adapter"
    scorer_moved = _largest_change(init / "scorer.safetensors", adapter / "scorer.safetensors")
    lora_moved = _largest_change(init / "adapter_model.safetensors", adapter / "adapter_model.safetensors")
    assert 0 < scorer_moved < 4 * 3 * 1e-6 and lora_moved > 1e-3, (scorer_moved, lora_moved)
    assert "lr 0.01 (scorer 1e-06)" in (adapter / "README.md").read_text()
    for overrides in ({"scorer_lr": 0.0}, {"freeze_scorer": True}, {"objective": "scorer", "decoder_adapter": False}):
        settings = {"init_adapter": str(init), "scorer_lr": 1e-4, **overrides}
        with pytest.raises(ValueError, match="--scorer-lr sets the scorer's learning rate"):
            _config(tiny_model_dir, corpus, tmp_path / "x", **settings)


def test_a_checkpoint_saved_before_a_setting_existed_reads_it_as_its_default():
    saved = {"lr": 0.01, "seed": 0}
    assert config_differences(saved, {"lr": 0.01, "seed": 0, "freeze_scorer": False}, {"freeze_scorer": False}) == []
    assert config_differences(saved, {"lr": 0.01, "seed": 0, "freeze_scorer": True}, {"freeze_scorer": False}) == [
        "freeze_scorer: False -> True"
    ]
    assert config_differences(saved, {"lr": 0.01, "seed": 0, "new": 1}) == ["new: '<absent>' -> 1"]
