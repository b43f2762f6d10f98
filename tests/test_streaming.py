"""Streaming sessions: parity with generate, re-rotation, bounded memory, multi-turn, bad input."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama, tiny_tokenizer
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from nugget2d.compress import Nugget2DConfig, Nugget2DModel
from nugget2d.compress.rope import rerotate
from nugget2d.runtime.generation import GenerationSettings
from nugget2d.runtime.session import StreamingSession, StreamSettings


def _session(settings: StreamSettings, **model_overrides) -> StreamingSession:
    model = Nugget2DModel.from_base(tiny_llama(**model_overrides), Nugget2DConfig(scorer_layer=1)).eval()
    return StreamingSession(model, tiny_tokenizer(), settings, chat=False)


def _random_ids(count: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 90, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("positions", ["cache", "original"])
def test_full_ratio_session_equals_model_generate(positions):
    document, prompt = _random_ids(60), _random_ids(5, seed=1)
    reference_model = tiny_llama()
    expected = reference_model.generate(
        torch.tensor([document + prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0
    )[0, 65:].tolist()
    session = _session(StreamSettings(ratio=1.0, budget=200, recent=16, segment=64, positions=positions))
    session.ingest_ids(document)
    got = list(session.ask_ids(prompt, GenerationSettings(max_new_tokens=20)))
    eos = reference_model.generation_config.eos_token_id
    expected = expected[: expected.index(eos)] if eos in expected else expected
    assert got == expected
    assert session.stats.encoder_calls == 1


ROPE_SCALINGS = [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 4.0},
    {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
]


@pytest.mark.parametrize("scaling", ROPE_SCALINGS, ids=lambda s: s["rope_type"])
def test_rerotated_keys_equal_keys_computed_at_the_new_positions(scaling):
    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_theta": 10000.0, **scaling},
    )
    rotary = LlamaRotaryEmbedding(config)
    generator = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 2, 12, 16, generator=generator)
    old = torch.randint(0, 200, (2, 12), generator=generator)
    new = torch.randint(0, 200, (2, 12), generator=generator)

    def rotated(positions):
        cos, sin = rotary(raw, position_ids=positions)
        return apply_rotary_pos_emb(raw, raw, cos, sin)[1]

    moved = rerotate(rotated(old), new - old, rotary)
    assert (moved - rotated(new)).abs().max() <= 1e-5


def test_dynamic_rotary_scaling_is_refused():
    with pytest.raises(ValueError, match="dynamic"):
        _session(
            StreamSettings(budget=96, recent=32, segment=16),
            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        )


@pytest.mark.parametrize("overflow", ["evict", "recompress"])
def test_stream_twenty_windows_with_bounded_cache(overflow):
    window, budget = 128, 96
    session = _session(
        StreamSettings(ratio=0.25, budget=budget, recent=32, segment=16, overflow=overflow),
        max_position_embeddings=window,
    )
    sizes = {}
    peak_entries, peak_position = 0, 0
    ids = _random_ids(20 * window)
    for step in range(0, len(ids), 64):
        session.ingest_ids(ids[step : step + 64])
        layer = session.cache.layers[0]
        peak_entries = max(peak_entries, session.cache.get_seq_length())
        peak_position = max(peak_position, int(layer.positions.max()))
        assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()
        if session.stats.tokens_ingested in (10 * window, 20 * window):
            sizes[session.stats.tokens_ingested] = session.cache.nbytes
    answer = list(session.ask_ids(_random_ids(4, seed=3), GenerationSettings(max_new_tokens=8)))
    assert len(answer) <= 8
    assert peak_entries <= budget and session.cache.get_seq_length() <= budget
    assert peak_position < window and int(session.cache.layers[0].positions.max()) < window
    assert sizes[10 * window] == sizes[20 * window]
    assert session.nuggets > 0 and session.cache.nugget_counts().item() == session.nuggets


def test_cache_positions_are_contiguous_after_compaction():
    session = _session(StreamSettings(ratio=0.25, budget=96, recent=32, segment=16))
    session.ingest_ids(_random_ids(500))
    positions = session.cache.layers[0].positions[0]
    assert positions.tolist() == list(range(len(positions)))
    counts = session.sinks + session.nuggets + session.raw
    assert counts == session.cache.get_seq_length()


@pytest.mark.parametrize("allocation", ["token", "head"])
def test_a_question_reads_the_recent_window_raw_wherever_the_last_segment_ended(allocation):
    """Before a question the tail of the last segment is compressed too: ``recent`` raw entries whatever
    the segment size, all inside the budget."""
    parts = {}
    for segment in (16, 48):
        model = Nugget2DModel.from_base(tiny_llama(), Nugget2DConfig(scorer_layer=1, allocation=allocation)).eval()
        settings = StreamSettings(ratio=0.25, budget=160, recent=32, segment=segment, allocation=allocation)
        session = StreamingSession(model, tiny_tokenizer(), settings, chat=False)
        session.ingest_ids(_random_ids(500))
        assert session.raw > 32  # the last segment is still raw after reading
        session.score_ids(_random_ids(10, seed=4), room=20)
        parts[segment] = (session.sinks, session.raw - 10)
        assert (
            session.nuggets > 0 and int(session.cache.entry_counts()[0]) == sum(parts[segment]) + 10 + session.nuggets
        )
        assert int(session.cache.entry_counts()[0]) <= 160
    assert parts[16] == parts[48] == (4, 32)


def test_second_question_does_not_reread_the_document():
    session = _session(StreamSettings(ratio=0.25, budget=160, recent=32, segment=32))
    session.ingest_ids(_random_ids(400))
    calls = session.stats.encoder_calls
    first = list(session.ask_ids(_random_ids(4, seed=5), GenerationSettings(max_new_tokens=6)))
    second = list(session.ask_ids(_random_ids(4, seed=6), GenerationSettings(max_new_tokens=6)))
    assert session.stats.encoder_calls == calls == 400 // 32 + 1
    assert first and second and session.turns == 2


def test_sampling_is_reproducible_with_a_seed():
    session = _session(StreamSettings(ratio=0.5, budget=160, recent=32, segment=32))
    session.ingest_ids(_random_ids(100))
    settings = GenerationSettings(
        max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=11
    )
    twin = session.fork()
    first = list(session.ask_ids([5, 6], settings))
    assert list(twin.ask_ids([5, 6], settings)) == first


def test_stopping_early_keeps_the_session_usable():
    session = _session(StreamSettings(ratio=0.5, budget=160, recent=32, segment=32))
    session.ingest_ids(_random_ids(100))
    stream = session.ask_ids([5, 6], GenerationSettings(max_new_tokens=50, temperature=1.0, seed=0))
    next(stream)
    stream.close()  # a client that disconnects
    assert session.turns == 1 and len(session.pending) == 1
    assert list(session.ask_ids([7], GenerationSettings(max_new_tokens=3)))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(budget=40, recent=32, segment=16), "budget"),
        (dict(ratio=0.0), "ratio"),
        (dict(ratio=1.5), "ratio"),
        (dict(overflow="drop"), "overflow"),
        (dict(budget=600, read_budget=300), "read_budget"),
        (dict(observation_window=-1), "observation_window"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        StreamSettings(**settings)


def test_prompt_longer_than_the_budget_is_refused_before_work():
    session = _session(StreamSettings(ratio=0.5, budget=100, recent=32, segment=32))
    session.ingest_ids(_random_ids(50))
    with pytest.raises(ValueError, match="does not fit the cache budget"):
        list(session.ask_ids(_random_ids(90), GenerationSettings(max_new_tokens=20)))
    assert session.turns == 0 and session.stats.generated_tokens == 0


def test_original_positions_refuse_text_beyond_the_window():
    session = _session(
        StreamSettings(budget=96, recent=32, segment=16, positions="original"), max_position_embeddings=128
    )
    with pytest.raises(ValueError, match="native window"):
        session.ingest_ids(_random_ids(200))


def test_empty_and_binary_inputs_are_refused(tmp_path):
    session = _session(StreamSettings(budget=96, recent=32, segment=16))
    with pytest.raises(ValueError, match="empty"):
        session.ingest("   ")
    binary = tmp_path / "x.bin"
    binary.write_bytes(b"\x00\x01\x02" * 10)
    with pytest.raises(ValueError, match="binary"):
        session.ingest(binary)
    assert session.stats.tokens_ingested == 0


def test_text_chunks_stream_like_one_string(tmp_path):
    text = "the old angler said that the river was good for fish . " * 30
    whole = _session(StreamSettings(budget=96, recent=32, segment=16))
    whole.ingest(text)
    pieces = _session(StreamSettings(budget=96, recent=32, segment=16))
    pieces.ingest(iter([text[i : i + 37] for i in range(0, len(text), 37)]))
    path = tmp_path / "t.txt"
    path.write_text(text)
    from_file = _session(StreamSettings(budget=96, recent=32, segment=16))
    from_file.ingest(path)
    assert whole.stats.tokens_ingested == pieces.stats.tokens_ingested == from_file.stats.tokens_ingested
    assert torch.equal(whole.cache.layers[0].keys, pieces.cache.layers[0].keys)


def test_a_text_inside_the_read_budget_is_read_with_full_attention():
    """With a read budget a text that fits is read whole: every token attends to every earlier one (the
    kept keys are those of one plain forward over the text), and only asking shrinks the cache into its
    budget. Streamed without one, the deep layers' keys differ (they saw a compressed past)."""
    document, question = _random_ids(200), _random_ids(6, seed=1)
    kept_equal = {}
    for read_budget in (256, None):
        settings = StreamSettings(
            ratio=0.25, budget=64, recent=16, segment=16, positions="original", read_budget=read_budget
        )
        session = _session(settings)
        reference = session.model.encode(torch.tensor([document]), cache=session.model.new_cache())
        session.ingest_ids(document)
        if read_budget:
            assert session.cache.get_seq_length() == len(document)  # nothing compressed while reading
        session.score_ids(question)
        assert session.cache.get_seq_length() <= settings.budget
        last, full = session.cache.layers[-1], reference.layers[-1]
        text = last.positions[0] < len(document)
        kept = last.positions[0, text]
        assert len(kept) > settings.recent  # nuggets and raw tokens
        kept_equal[read_budget] = torch.allclose(last.keys[0, :, text], full.keys[0, :, kept], atol=1e-5)
    assert kept_equal == {256: True, None: False}


def test_a_longer_text_never_holds_more_than_the_read_budget():
    settings = StreamSettings(ratio=0.25, budget=64, recent=16, segment=16, read_budget=128)
    session = _session(settings)
    peak = 0
    ids = _random_ids(600)
    for step in range(0, len(ids), 16):
        session.ingest_ids(ids[step : step + 16])
        peak = max(peak, session.cache.get_seq_length())
    assert peak == settings.read_budget
    answer = list(session.ask_ids(_random_ids(4, seed=3), GenerationSettings(max_new_tokens=4)))
    assert answer and session.cache.get_seq_length() <= settings.budget
    assert session.nuggets > 0


def test_scorings_with_the_same_room_read_the_same_cache():
    """``score_ids(room=…)`` frees the same entries whatever the scored length, so a short scoring is the
    start of a long one (teacher forcing is causal); freeing only what each needs keeps more for the short."""
    session = _session(StreamSettings(ratio=0.25, budget=96, recent=16, segment=16, policy="streaming"))
    session.ingest_ids(_random_ids(300))
    ids = _random_ids(30, seed=4)
    long = session.fork().score_ids(ids, room=40)
    torch.testing.assert_close(session.fork().score_ids(ids[:6], room=40), long[:5])
    assert not torch.allclose(session.fork().score_ids(ids[:6]), long[:5])
    with pytest.raises(ValueError, match="do not fit"):
        session.fork().score_ids(ids[:6], room=95)
