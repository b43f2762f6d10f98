"""Other model families: Gemma 3 (sliding-window and global layers, per-layer RoPE, QK-norm, head dim ≠
hidden / heads, its own attention scaling), Qwen3 (QK-norm) and a Mistral-style sliding window —
parity with the base model, re-rotation per layer, streaming past the native window, sizes, files."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, WINDOW, tiny_gemma3, tiny_mistral, tiny_qwen3, tiny_tokenizer

from nugget2d.compress import MASKED, Nugget2DConfig, Nugget2DModel, NuggetCache
from nugget2d.compress.hf_compat import CACHE_ARGUMENT
from nugget2d.compress.policies import PerHeadBudget
from nugget2d.compress.policies.per_head import percentiles
from nugget2d.runtime.generation import GenerationSettings
from nugget2d.runtime.session import StreamingSession, StreamSettings

FAMILIES = {"gemma3": tiny_gemma3, "qwen3": tiny_qwen3, "mistral": tiny_mistral}


def _wrap(base, **settings) -> Nugget2DModel:
    return Nugget2DModel.from_base(base, Nugget2DConfig(**{"ratio": 1.0, "scorer_layer": 1, **settings})).eval()


def _ids(count: int, seed: int = 0) -> list[int]:
    return torch.randint(3, VOCAB, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_over_all_nuggets_equals_the_base_model(family, backend):
    tokens = torch.tensor([_ids(40), _ids(40, seed=1)])
    base = FAMILIES[family]()
    with torch.no_grad():
        reference = base(tokens).logits  # transformers' own attention and sliding-window mask
    model = _wrap(base, positions="cache")  # at r = 1 the same positions as the text's
    model.set_attention(backend)
    with torch.no_grad():
        nuggets = model.compress(tokens[:, :25])
        logits = model(tokens[:, 25:], nuggets=nuggets).logits
    assert (logits - reference[:, 25:]).abs().max() <= 1e-5
    for layer, window in zip(nuggets.layers, model.layer_windows):
        assert layer.get_seq_length() == (25 if window is None else window - 1)


def test_layer_types_and_rotaries_are_read_from_the_model():
    gemma = _wrap(tiny_gemma3())
    assert gemma.layer_windows == [WINDOW, None, WINDOW, None] and gemma.compressed_layers == [1, 3]
    local, global_ = gemma.layer_rotary(0), gemma.layer_rotary(1)
    assert (local.layer_type, global_.layer_type) == ("sliding_attention", "full_attention")
    assert isinstance(gemma.rotary_emb, tuple) and len(gemma.rotary_emb) == 4
    assert _wrap(tiny_mistral()).layer_windows == [WINDOW] * 4
    qwen = _wrap(tiny_qwen3())
    assert qwen.layer_windows == [None] * 4 and not isinstance(qwen.rotary_emb, tuple)


def test_each_layer_is_moved_with_its_own_rope():
    """Keys computed at text positions + 37, renumbered by the cache, equal keys computed at the
    renumbered positions: each layer re-rotated with its own base and scaling (a shared one fails)."""
    model = _wrap(tiny_gemma3(), positions="original")
    tokens = torch.tensor([_ids(20)])
    mask = torch.ones_like(tokens, dtype=torch.bool)
    expected = model.encode(tokens)
    shifted = model.new_cache()
    positions = torch.arange(20)[None] + 37
    shifted.begin_step(positions, mask)
    with torch.no_grad():
        model.base.get_decoder()(
            input_ids=tokens, position_ids=positions, **{CACHE_ARGUMENT: shifted}, use_cache=True, nugget_cache=shifted
        )
    shifted.end_step()
    shifted.position_mode = "cache"
    shifted.reposition(model.rotary_emb)
    for moved, reference in zip(shifted.layers, expected.layers):
        assert torch.equal(moved.positions, reference.positions)
        assert (moved.keys - reference.keys).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_a_full_ratio_session_answers_as_generate(family):
    document, prompt = _ids(30), _ids(5, seed=1)
    expected = (
        FAMILIES[family]()
        .generate(
            torch.tensor([document + prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0
        )[0, 35:]
        .tolist()
    )
    session = StreamingSession(
        _wrap(FAMILIES[family]()), tiny_tokenizer(), StreamSettings(ratio=1.0, budget=200, recent=8, segment=16), False
    )
    session.ingest_ids(document)
    got = list(session.ask_ids(prompt, GenerationSettings(max_new_tokens=12)))
    stops = [i for i, token in enumerate(expected) if token in session._eos_ids()]
    assert got == expected[: stops[0] if stops else None]


@pytest.mark.parametrize("allocation", ["token", "head"])
@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_past_the_native_window_keeps_each_layer_type_bounded(family, allocation):
    native, budget = 64, 40
    model = _wrap(FAMILIES[family](max_position_embeddings=native), ratio=0.25, allocation=allocation)
    settings = StreamSettings(ratio=0.25, budget=budget, recent=8, segment=16, allocation=allocation)
    session = StreamingSession(model, tiny_tokenizer(), settings, chat=False)
    ids = _ids(6 * native)
    for step in range(0, len(ids), 32):
        session.ingest_ids(ids[step : step + 32])
        in_use = 0
        for layer, window in zip(session.cache.layers, model.layer_windows):
            assert torch.isfinite(layer.keys).all() and int(layer.positions.max()) < native
            if window is not None:
                assert layer.get_seq_length() == window - 1  # exactly its window, never compressed
                assert not bool(layer.is_nugget.any())
            else:  # per head, heads and layers hold different numbers of entries: budget · heads · layers in all
                in_use += int((layer.bias > MASKED / 2).expand(-1, layer.kv_heads, -1).sum())
        assert in_use <= budget * model.num_kv_heads * len(model.compressed_layers)
    answer = list(session.ask_ids(_ids(4, seed=3), GenerationSettings(max_new_tokens=6)))
    assert 1 <= len(answer) <= 6
    if model.compressed_layers:
        assert session.nuggets > 0


def test_per_head_budget_is_spent_on_global_layers_only():
    model = _wrap(tiny_gemma3(), allocation="head", positions="cache")
    cache = model.encode(torch.tensor([_ids(30)]))
    PerHeadBudget().keep(cache, torch.tensor([12]), model.rotary_emb, pool=20)
    # entries in use beyond the 10 candidates left out of the pool (the first 10 of 30)
    kept = [int((layer.bias > -1).sum()) - 10 * layer.kv_heads for layer in cache.layers]
    assert kept[1] + kept[3] == 12
    for index in (0, 2):  # the sliding-window layers: their window, raw, untouched
        assert cache.layers[index].get_seq_length() == WINDOW - 1 and not cache.layers[index].packed


def test_sizes_count_what_each_layer_type_stores():
    model = _wrap(tiny_gemma3())
    tokens = torch.tensor([_ids(30)])
    cache = model.compress(tokens)
    config = model.base.config
    per_entry = 2 * config.num_key_value_heads * config.head_dim * 4
    assert model.full_kv_bytes(30) == per_entry * (2 * 30 + 2 * (WINDOW - 1))
    assert model.full_kv_bytes(5) == per_entry * 4 * 5
    assert cache.kv_nbytes() == model.full_kv_bytes(30)
    assert cache.stored_entries().tolist() == [(2 * 30 + 2 * (WINDOW - 1)) * config.num_key_value_heads]


@pytest.mark.parametrize("allocation", ["token", "head"])
def test_a_gemma3_cache_saved_and_loaded_round_trips_per_layer_type(tmp_path, allocation):
    model = _wrap(tiny_gemma3(), ratio=0.25, allocation=allocation, positions="cache")
    cache = model.compress(torch.tensor([_ids(30)]))
    loaded = NuggetCache.load(cache.save(tmp_path / "cache.safetensors"))
    assert loaded.windows == [WINDOW, None, WINDOW, None] == cache.windows
    for before, after in zip(cache.layers, loaded.layers):
        assert before.get_seq_length() == after.get_seq_length() and after.packed == before.packed
        for name, value in before.tensors().items():
            assert torch.equal(value, after.tensors()[name]), name
    question = torch.tensor([_ids(4, seed=2)])
    with torch.no_grad():
        assert torch.equal(model(question, nuggets=cache).logits, model(question, nuggets=loaded).logits)


def test_without_training_the_observed_attention_alone_chooses():
    """The training-free setting: a zero scorer ranks nothing, so each global layer's heads keep the entries
    the last queries attended to most (the per-layer split of their attention percentiles)."""
    model = Nugget2DModel.training_free(tiny_gemma3(), ratio=0.25)
    cache = model.new_cache(positions="original")
    model.encode(torch.tensor([_ids(30)]), cache=cache)
    heads = model.num_kv_heads
    observed = [torch.rand(1, heads, 30, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    rule = PerHeadBudget()
    expected = rule.split_per_layer(percentiles([seen[..., 10:] for seen in observed]), torch.tensor([8]))
    rule.keep(cache, torch.tensor([8]), model.rotary_emb, pool=20, observed=observed)
    for index, picked in zip(model.compressed_layers, expected):
        layer = cache.layers[index]
        for head in range(heads):
            in_use = layer.bias[0, head, 10 : layer.get_seq_length()] > MASKED / 2
            kept = layer.positions[0, head, 10 : layer.get_seq_length()][in_use]
            assert kept.tolist() == (picked[0, head].nonzero()[:, 0] + 10).tolist()


def test_the_scorer_objective_ranks_the_global_layers_entries_only():
    """``--objective scorer`` on a model with sliding-window layers (Gemma 3): their entries are never
    compressed, so their importance is 0 and the ranking loss covers the global layers' entries alone;
    it is finite and reaches the scorer."""
    from nugget2d.runtime.importance import kv_importance
    from nugget2d.runtime.objectives import ScorerObjective

    model = Nugget2DModel.from_base(tiny_gemma3(), Nugget2DConfig(scorer_layer=1, allocation="head"))
    context = torch.tensor([_ids(40)])
    repeat = torch.cat([torch.tensor([[5, 6, 7]]), context], dim=1)
    masks = torch.ones_like(context), torch.ones_like(repeat)
    found = kv_importance(model, context, masks[0], repeat, masks[1])
    assert model.compressed_layers == [1, 3]
    assert not found.scores[:, [0, 2]].any() and bool((found.scores[:, [1, 3]] > 0).all())
    objective = ScorerObjective(model)
    scores, importance, valid = objective.predict(context, masks[0], repeat, masks[1])
    assert scores.shape == importance.shape == valid.shape == (1, 2 * model.num_kv_heads * 40)
    loss = objective(context, masks[0], repeat, masks[1])
    loss.backward()
    assert torch.isfinite(loss) and model.scorer.net[0].weight.grad.abs().sum() > 0
