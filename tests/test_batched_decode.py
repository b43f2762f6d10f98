"""Batched decoding: streams over ragged caches decoded in one pass per step give the tokens (and the
caches) each gives decoding alone."""

from __future__ import annotations

import pytest
import torch
from tiny_models import WINDOW, tiny_gemma3, tiny_llama, tiny_tokenizer

from nugget2d.compress import Nugget2DConfig, Nugget2DModel
from nugget2d.compress.cache_batch import stack_caches, unstack_row
from nugget2d.runtime.batched_decode import DecodeBatcher, ask_together, run_together
from nugget2d.runtime.generation import GenerationSettings
from nugget2d.runtime.session import StreamingSession, StreamSettings

GREEDY = GenerationSettings(max_new_tokens=12, ignore_eos=True)


def _model(allocation: str, base=tiny_llama) -> Nugget2DModel:
    torch.manual_seed(0)
    return Nugget2DModel.from_base(base(), Nugget2DConfig(allocation=allocation, scorer_layer=1))


def _ids(length: int, seed: int) -> list[int]:
    return torch.randint(3, 60, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _sessions(model: Nugget2DModel, positions: str) -> list[StreamingSession]:
    """Ragged caches: documents of different lengths read at different ratios, and a plain prompt's."""
    sessions = []
    for length, ratio in ((180, 0.25), (96, 0.5), (40, 0.25), (0, 0.25)):
        settings = StreamSettings(budget=64, recent=16, segment=16, sinks=2, ratio=ratio, positions=positions)
        session = StreamingSession(model, tiny_tokenizer(), settings, chat=False)
        if length:
            session.ingest_ids(_ids(length, seed=length), final=True)
        sessions.append(session)
    return sessions


def _decode(sessions: list[StreamingSession], batcher: DecodeBatcher | None) -> list[list[int]]:
    prompts = [_ids(5 + 2 * i, seed=100 + i) for i in range(len(sessions))]
    if batcher is None:
        return [list(s.ask_ids(p, GREEDY)) for s, p in zip(sessions, prompts)]
    streams = [s.ask_ids(p, GREEDY, batcher=batcher) for s, p in zip(sessions, prompts)]
    return run_together(streams, batcher)


@pytest.mark.parametrize("allocation", ["token", "head"])
@pytest.mark.parametrize("positions", ["cache", "original"])
def test_batched_greedy_decoding_equals_each_stream_alone(allocation, positions):
    model = _model(allocation)
    sessions = _sessions(model, positions)
    assert len({s.cache.get_seq_length() for s in sessions}) == len(sessions)  # ragged
    if allocation == "head":
        assert any(layer.packed for s in sessions for layer in s.cache.layers)
    alone = [s.fork() for s in sessions]
    together = [s.fork() for s in sessions]
    expected = _decode(alone, None)
    batcher = DecodeBatcher(model, max_batch=8)
    assert _decode(together, batcher) == expected
    assert batcher.stats.largest == len(sessions) and batcher.stats.passes == GREEDY.max_new_tokens - 1
    for solo, batched in zip(alone, together):  # each stream keeps the cache it would have alone
        assert batched.pending == solo.pending and batched.stats.cache_tokens == solo.stats.cache_tokens
        for mine, theirs in zip(batched.cache.layers, solo.cache.layers):
            torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-5)
            assert torch.equal(mine.bias, theirs.bias) and torch.equal(mine.positions, theirs.positions)
        assert torch.equal(batched.cache.seen_tokens, solo.cache.seen_tokens)


@pytest.mark.parametrize("allocation", ["token", "head"])
def test_sliding_window_layers_decode_batched_as_alone(allocation):
    """Gemma 3's mixed layers: sliding-window layers (window shorter than the texts) keep their window in
    the stack and give each stream back the window it would hold alone."""
    model = _model(allocation, tiny_gemma3)
    sessions = _sessions(model, "cache")
    assert any(layer.sliding for layer in sessions[0].cache.layers)
    alone, together = [s.fork() for s in sessions], [s.fork() for s in sessions]
    settings = GenerationSettings(max_new_tokens=2 * WINDOW, ignore_eos=True)
    prompts = [_ids(3 + i, seed=50 + i) for i in range(len(sessions))]
    expected = [list(s.ask_ids(p, settings)) for s, p in zip(alone, prompts)]
    batcher = DecodeBatcher(model, max_batch=8)
    streams = [s.ask_ids(p, settings, batcher=batcher) for s, p in zip(together, prompts)]
    assert run_together(streams, batcher) == expected
    assert batcher.stats.largest == len(sessions)  # all four in one stack
    for solo, batched in zip(alone, together):
        for mine, theirs in zip(batched.cache.layers, solo.cache.layers):
            torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-5)
            assert torch.equal(mine.bias, theirs.bias) and torch.equal(mine.positions, theirs.positions)


@pytest.mark.parametrize("max_batch", [3, 8])
def test_streams_that_leave_midway_still_decode_as_alone(max_batch):
    """Streams stop after 3, 12, 7 and 9 tokens: with room for all, those that stop leave ghost rows and the
    others run on in the same stack; with room for 3 the fourth waits, then joins (a new stack)."""
    model = _model("head")
    sessions = _sessions(model, "cache")
    lengths = [3, 12, 7, 9]
    prompts = [_ids(4, seed=7 + i) for i in range(len(sessions))]
    alone, together = [s.fork() for s in sessions], [s.fork() for s in sessions]
    expected = [
        list(s.ask_ids(p, GenerationSettings(max_new_tokens=n, ignore_eos=True)))
        for s, p, n in zip(alone, prompts, lengths)
    ]
    batcher = DecodeBatcher(model, max_batch=max_batch)
    streams = [
        s.ask_ids(p, GenerationSettings(max_new_tokens=n, ignore_eos=True), batcher=batcher)
        for s, p, n in zip(together, prompts, lengths)
    ]
    assert run_together(streams, batcher) == expected
    assert batcher.stats.largest == min(max_batch, 4)
    assert batcher.stats.stacks == (1 if max_batch == 8 else 2)  # ghosts, no restack, until one stream is left
    for solo, batched in zip(alone, together):
        for mine, theirs in zip(batched.cache.layers, solo.cache.layers):
            torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-5)
            assert torch.equal(mine.bias, theirs.bias) and torch.equal(mine.positions, theirs.positions)


def test_a_stream_closed_after_its_pass_ran_keeps_its_session_usable():
    """Closed between the batched pass and taking its result: the fed token is in the cache, none pending."""
    model = _model("token")
    session = _sessions(model, "cache")[0]
    alone, other = session.fork(), session.fork()
    solo = alone.ask_ids(_ids(4, 1), GREEDY)
    first = next(solo)
    solo.close()  # the reference: closed before its first token was fed
    assert alone.pending == [first]
    batcher = DecodeBatcher(model)
    tokens = session.ask_ids(_ids(4, 1), GREEDY, batcher=batcher)
    others = other.ask_ids(_ids(4, 2), GREEDY, batcher=batcher)
    assert next(tokens) == first and next(others) is not None
    assert next(tokens) is None and next(others) is None  # both queued
    batcher.run()
    tokens.close()
    assert session.pending == [] and session.cache.get_seq_length() == alone.cache.get_seq_length() + 1
    expected = list(_sessions(model, "cache")[0].fork().ask_ids(_ids(4, 2), GREEDY))
    assert run_together([others], batcher) == [expected[1:]]
    assert "".join(session.ask("the", GenerationSettings(max_new_tokens=3))) is not None


def test_ask_together_answers_every_question_and_reports_a_bad_one():
    model = _model("token")
    session = _sessions(model, "cache")[1]
    settings = GenerationSettings(max_new_tokens=6)
    questions = ["the old angler", "a blue book", "the river " * 40]  # the last is too long for the budget
    answers = ask_together([session.fork() for _ in questions], questions, settings, max_batch=4)
    assert answers[:2] == ["".join(session.fork().ask(q, settings)) for q in questions[:2]]
    assert isinstance(answers[2], ValueError) and "budget" in str(answers[2])


def test_stacking_pads_each_row_with_masked_slots_and_unstacking_restores_it():
    model = _model("head")
    caches = [s.cache for s in _sessions(model, "cache")[:3]]
    stacked = stack_caches(caches)
    assert stacked.batch_size == 3
    assert torch.equal(stacked.entry_counts(), torch.cat([c.entry_counts() for c in caches]))
    for row, cache in enumerate(caches):
        back = unstack_row(stacked, row, cache, 0)
        for mine, theirs in zip(back.layers, cache.layers):
            assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.bias, theirs.bias)
    with pytest.raises(ValueError, match="one-row caches"):
        stack_caches([caches[0], _model("token").new_cache(positions="original")])
