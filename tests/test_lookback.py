"""Look-back (runtime/lookback.py): token ids kept, spans read for one answer and dropped after."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from tiny_models import WORDS, tiny_llama, tiny_tokenizer

from nugget2d.compress import Nugget2DConfig, Nugget2DModel
from nugget2d.compress.hf_compat import returned_cache
from nugget2d.runtime import lookback as lookback_module
from nugget2d.runtime.generation import GenerationSettings, TokenStream
from nugget2d.runtime.lookback import IDS_FILE, LookBack
from nugget2d.runtime.lookback_select import Candidates, bm25_scores, choose_spans, windows
from nugget2d.runtime.session import CacheConfig, StreamingSession

FACT = "the secret code is blue door"
QUESTION = "what is the secret code ?"


def _text(words: int = 400, seed: int = 0, fact_at: int = 100) -> str:
    generator = torch.Generator().manual_seed(seed)
    picks = [WORDS[i] for i in torch.randint(0, 60, (words,), generator=generator).tolist()]
    picks[fact_at : fact_at + 6] = FACT.split()
    return " ".join(picks)


def _session(allocation: str = "head", positions: str = "auto", fact_at: int = 100, **settings) -> StreamingSession:
    config = Nugget2DConfig(scorer_layer=1, allocation=allocation)
    model = Nugget2DModel.from_base(tiny_llama(max_position_embeddings=1024), config).eval()
    shape = dict(ratio=0.25, budget=160, recent=32, segment=32, allocation=allocation, positions=positions)
    session = StreamingSession(model, tiny_tokenizer(), CacheConfig(**{**shape, **settings}), chat=False)
    session.ingest(_text(fact_at=fact_at))
    return session


def _question(session: StreamingSession) -> list[int]:
    return session.tokenizer(QUESTION, add_special_tokens=False).input_ids


def _tensors(session: StreamingSession) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in layer.tensors().items()} for layer in session.cache.layers]


def _same(before: list[dict], session: StreamingSession) -> bool:
    after = [layer.tensors() for layer in session.cache.layers]
    return all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(before, after))


def _answering_caches(monkeypatch) -> list:
    """The caches look-back answers are generated over, as each answer starts (forks: what the answer
    appends does not show)."""
    seen: list = []

    class Watched(TokenStream):
        def __init__(self, model, cache, *args, **kwargs):
            seen.append(cache.fork())
            super().__init__(model, cache, *args, **kwargs)

    monkeypatch.setattr(lookback_module, "TokenStream", Watched)
    return seen


def test_lookback_zero_answers_as_before():
    """Look-back 0 is today's path: the same tokens as a stream over the session's cache, the exchange kept."""
    session = _session(lookback=0)
    twin = session.fork()
    prompt, settings = _question(session), GenerationSettings(max_new_tokens=6)
    twin._open_turn(len(prompt) + settings.max_new_tokens)
    expected = list(TokenStream(twin.model, twin.cache, prompt, settings, twin._eos_ids()))
    assert list(session.ask_ids(prompt, settings)) == expected
    assert session.turns == 1 and len(session.token_ids) == int(session.cache.seen_tokens[0])


@pytest.mark.parametrize("allocation", ["token", "head"])
@pytest.mark.parametrize("selector", ["attention", "bm25", "hybrid"])
def test_the_cache_after_a_lookback_question_equals_the_one_before(allocation, selector):
    session = _session(allocation, positions="original")
    session.ingest_ids([], final=True)
    before, ids, turns = _tensors(session), list(session.token_ids), session.turns
    out = list(
        session.ask_ids(_question(session), GenerationSettings(max_new_tokens=4), lookback=LookBack(64, selector))
    )
    assert out and session.lookback_stats.tokens_read > 0
    assert _same(before, session) and list(session.token_ids) == ids and session.turns == turns
    again = list(
        session.ask_ids(_question(session), GenerationSettings(max_new_tokens=4), lookback=LookBack(64, selector))
    )
    assert again == out  # the next question starts from the same cache


@pytest.mark.parametrize("placement", ["after", "text"])
def test_oracle_spans_are_in_the_cache_while_answering_and_gone_after(monkeypatch, placement):
    session = _session(positions="original")
    session.ingest_ids([], final=True)
    before = _tensors(session)
    seen = _answering_caches(monkeypatch)
    look = LookBack(64, "oracle", span=16, placement=placement, answers=("blue door",))
    list(session.ask_ids(_question(session), GenerationSettings(max_new_tokens=3), lookback=look))
    spans = session.lookback_stats.last_spans
    fact_at = list(session.token_ids).index(session.tokenizer.convert_tokens_to_ids("blue"))
    assert spans and any(a <= fact_at < b for a, b in spans) and sum(b - a for a, b in spans) <= 64
    length, positions = seen[0].get_seq_length(), seen[0].layers[0].positions
    read = sum(b - a for a, b in spans)
    twin = session.fork()
    twin._open_turn(len(_question(session)) + 3)
    assert length == twin.cache.get_seq_length() + read  # the spans, raw, on top of the cache the question reads
    tail = positions[0, -read:] if positions.dim() == 2 else positions[0, 0, -read:]
    if placement == "text":
        assert tail.tolist() == [p for a, b in spans for p in range(a, b)]
    else:
        seen_tokens = int(session.cache.seen_tokens[0])
        assert tail.tolist() == list(range(seen_tokens, seen_tokens + read))
    assert _same(before, session)


def test_spans_read_alone_answer_over_the_opening_and_the_spans_only(monkeypatch):
    """``placement="alone"``: the answer reads the text's opening (here the sinks) and the oracle's spans,
    nothing of the resident cache; the session's cache is as before, and the same question asked again
    answers the same."""
    session = _session()
    session.ingest_ids([], final=True)
    before = _tensors(session)
    seen = _answering_caches(monkeypatch)
    look = LookBack(64, "oracle", span=16, placement="alone", answers=("blue door",))
    settings = GenerationSettings(max_new_tokens=3)
    out = list(session.ask_ids(_question(session), settings, lookback=look))
    spans = session.lookback_stats.last_spans
    ids = np.frombuffer(session.token_ids, dtype=np.int32)
    opening = ids[: session.sinks].tolist()
    read = opening + [int(t) for a, b in spans for t in ids[a:b]]
    assert spans and seen[0].get_seq_length() == len(read)
    expected = session.model.read(torch.tensor([read]), session.model.new_cache())
    for a, b in zip(seen[0].layers, expected.layers):
        for name, value in a.tensors().items():
            assert torch.allclose(value.float(), b.tensors()[name].float(), atol=1e-5), name
    assert _same(before, session)
    assert list(session.ask_ids(_question(session), settings, lookback=look)) == out


@pytest.mark.parametrize(
    ("positions", "tokens", "expected"),
    [("original", 64, "after"), ("cache", 64, "alone"), ("original", 1024, "alone")],
)
def test_auto_placement_reads_after_the_cache_inside_the_window_and_alone_past_it(
    monkeypatch, positions, tokens, expected
):
    """The default placement: spans after the cache while it is numbered by text position and the spans,
    the question and the answer stay inside the model's window (1,024 tokens here); alone otherwise,
    answering what the named placement answers, with the session's cache unchanged (not renumbered)."""
    session = _session(positions=positions)
    session.ingest_ids([], final=True)
    before, mode = _tensors(session), session.cache.position_mode
    seen = _answering_caches(monkeypatch)
    settings = GenerationSettings(max_new_tokens=3)
    auto = LookBack(tokens, "oracle", span=16, answers=("blue door",))
    assert auto.placement == "auto" == CacheConfig().lookback_placement
    out = list(session.ask_ids(_question(session), settings, lookback=auto))
    assert session.lookback_stats.last_placement == expected
    read = sum(b - a for a, b in session.lookback_stats.last_spans)
    if expected == "alone":
        assert seen[0].get_seq_length() == session.opening_length() + read
    else:
        assert seen[0].get_seq_length() > read + session.opening_length()  # the resident entries too
    named = dataclasses.replace(auto, placement=expected)
    assert list(session.ask_ids(_question(session), settings, lookback=named)) == out
    assert _same(before, session) and session.cache.position_mode == mode


def test_spans_read_alone_may_come_from_the_raw_window():
    """Alone, the answer holds none of the recent raw window, so look-back may read from it (a fact in
    the last tokens is found); after the cache it is there already and never read twice."""
    session = _session(positions="cache", fact_at=390)
    session.ingest_ids([], final=True)
    fact_at = list(session.token_ids).index(session.tokenizer.convert_tokens_to_ids("blue"))
    assert fact_at >= len(session.token_ids) - session.raw  # in the raw window
    settings = GenerationSettings(max_new_tokens=2)
    for placement, found in (("alone", True), ("after", False)):
        look = LookBack(64, "oracle", span=16, placement=placement, answers=("blue door",))
        list(session.ask_ids(_question(session), settings, lookback=look))
        spans = session.lookback_stats.last_spans
        assert any(a <= fact_at < b for a, b in spans) is found, (placement, spans)


@pytest.mark.parametrize(("allocation", "positions"), [("head", "cache"), ("token", "cache"), ("head", "original")])
def test_questions_decoded_together_look_back_as_asked_one_by_one(allocation, positions):
    """A batch job's questions (``ask_together``) look back as ``ask`` does, alone or after the cache."""
    from nugget2d.runtime.batched_decode import ask_together

    session = _session(allocation, positions=positions, lookback=64)
    session.ingest_ids([], final=True)
    questions, settings = [QUESTION, "who had the book ?", QUESTION], GenerationSettings(max_new_tokens=4)
    forks = [session.fork() for _ in questions]
    together = ask_together(forks, questions, settings)
    assert all(fork.lookback_stats.questions == 1 for fork in forks)
    assert together == ["".join(session.fork().ask(q, settings)) for q in questions]


def test_the_opening_is_the_chat_start_however_the_text_was_read():
    """What ``alone`` reads before its spans: the chat template's start a session put in, the same start
    when the caller formatted the text itself (a server's compressed prompt), else the sinks."""
    from serve_helpers import TEMPLATE

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    model = Nugget2DModel.from_base(tiny_llama(max_position_embeddings=1024), Nugget2DConfig(scorer_layer=1)).eval()
    shape = CacheConfig(ratio=0.25, budget=160, recent=32, segment=32)
    chat = StreamingSession(model, tokenizer, shape, chat=True)
    chat.ingest(_text())
    start = chat._start_ids()
    assert len(start) > chat.sinks and chat.opening_length() == len(start)
    formatted = StreamingSession(model, tokenizer, shape, chat=False)
    formatted.ingest_formatted(start + tokenizer(_text(), add_special_tokens=False).input_ids)
    assert formatted.opening_length() == len(start)
    plain = StreamingSession(model, tokenizer, shape, chat=False)
    plain.ingest_formatted(tokenizer(_text(), add_special_tokens=False).input_ids)
    assert plain.opening_length() == plain.sinks


def test_spans_placed_after_the_cache_read_in_one_pass_as_span_by_span():
    """Spans placed after the cache are read as one block, as a prompt is read: the same entries as reading
    them one by one."""
    session = _session()
    ids = np.frombuffer(session.token_ids, dtype=np.int32)
    spans = [(10, 30), (60, 70), (100, 120)]
    block = lookback_module.read_spans(session.model, session.cache, ids, spans, "after")
    one_by_one = session.cache.fork()
    for start, stop in spans:
        session.model.read(torch.tensor([ids[start:stop].tolist()]), one_by_one)
    for a, b in zip(block.layers, one_by_one.layers):
        for name, value in a.tensors().items():
            assert torch.allclose(value.float(), b.tensors()[name].float(), atol=1e-5), name


def test_spans_are_read_as_the_question_is_not_by_the_encoder():
    """Spans are read for one answer and never compressed: with a trained encoder LoRA their entries are
    the unmodified model's (what the question is read by), not the encoder's."""
    session = _session()
    with torch.no_grad():
        for name, parameter in session.model.named_parameters():
            if "lora_B" in name and ".encoder." in name:
                parameter.normal_(std=0.05)
    ids = np.frombuffer(session.token_ids, dtype=np.int32)
    spans = [(10, 30)]
    fork = lookback_module.read_spans(session.model, session.cache, ids, spans, "after")
    with torch.no_grad():
        as_prompt = returned_cache(session.model(torch.tensor([ids[10:30].tolist()]), nuggets=session.cache))
        by_encoder = session.model.encode(torch.tensor([ids[10:30].tolist()]), cache=session.cache.fork())
    values = fork.layers[1].tensors()["values"]
    assert torch.allclose(values.float(), as_prompt.layers[1].tensors()["values"].float(), atol=1e-5)
    assert not torch.allclose(values.float(), by_encoder.layers[1].tensors()["values"].float(), atol=1e-3)


def test_token_ids_survive_save_and_load(tmp_path):
    session = _session()
    list(session.ask_ids(_question(session), GenerationSettings(max_new_tokens=3)))
    assert len(session.token_ids) == int(session.cache.seen_tokens[0])
    session.save(tmp_path / "s")
    loaded = StreamingSession.load(tmp_path / "s", session.model, session.tokenizer)
    assert list(loaded.token_ids) == list(session.token_ids)
    look = LookBack(64, "bm25")
    settings = GenerationSettings(max_new_tokens=4)
    assert list(loaded.ask_ids(_question(session), settings, lookback=look)) == list(
        session.ask_ids(_question(session), settings, lookback=look)
    )


def test_a_session_saved_without_ids_refuses_lookback_clearly(tmp_path):
    session = _session()
    session.save(tmp_path / "old")
    (tmp_path / "old" / IDS_FILE).unlink()  # as sessions were saved before they kept their ids
    old = StreamingSession.load(tmp_path / "old", session.model, session.tokenizer)
    assert old.token_ids is None
    with pytest.raises(ValueError, match="saved before sessions kept"):
        list(old.ask_ids(_question(session), GenerationSettings(max_new_tokens=2), lookback=64))
    assert list(old.ask_ids(_question(session), GenerationSettings(max_new_tokens=2)))  # look-back 0 still answers


def test_bad_lookback_values_are_refused():
    with pytest.raises(ValueError, match="lookback must be >= 0"):
        CacheConfig(lookback=-1)
    with pytest.raises(ValueError, match="lookback must be a whole number"):
        LookBack(-5)
    with pytest.raises(ValueError, match="selector must be one of"):
        LookBack(64, "magic")
    with pytest.raises(ValueError, match="oracle selector needs the answers"):
        LookBack(64, "oracle")
    with pytest.raises(ValueError, match="cutoff must be a share of the best score, 0 to 1"):
        LookBack(64, cutoff=1.5)
    with pytest.raises(ValueError, match="placement must be one of"):
        LookBack(64, placement="middle")
    with pytest.raises(ValueError, match="lookback_placement must be one of"):
        CacheConfig(lookback_placement="middle")
    session = _session()
    with pytest.raises(ValueError, match="lookback must be a whole number"):
        list(session.ask_ids(_question(session), GenerationSettings(max_new_tokens=2), lookback=-3))


def test_attention_selector_needs_text_positions():
    session = _session("token", positions="cache")
    with pytest.raises(ValueError, match="use the bm25 selector"):
        list(
            session.ask_ids(
                _question(session), GenerationSettings(max_new_tokens=2), lookback=LookBack(64, "attention")
            )
        )
    out = list(
        session.ask_ids(_question(session), GenerationSettings(max_new_tokens=2), lookback=LookBack(64, "hybrid"))
    )
    assert out and session.lookback_stats.tokens_read > 0  # hybrid falls back to BM25


def test_spans_are_the_best_windows_within_the_budget_merged():
    wins = windows(4, 100, 16)
    assert wins[0] == (4, 20) and wins[-1][1] == 100 and all(b - a == 16 for a, b in wins)
    scores = np.zeros(len(wins))
    scores[[0, 1, 5]] = [3.0, 2.0, 1.0]
    assert choose_spans(scores, wins, 24) == [(4, 28)]  # 0 and 1 overlap by half: 24 tokens
    assert choose_spans(scores, wins, 40) == [(4, 28), (44, 60)]
    assert choose_spans(np.zeros(len(wins)), wins, 40) == []  # nothing scores: nothing is read
    assert choose_spans(scores, wins, 8) == [(8, 16)]  # a window longer than the look-back: its middle
    assert choose_spans(scores, wins, 40, cutoff=0.5) == [(4, 28)]  # 1.0 is below half the best (3.0)
    assert choose_spans(scores, wins, 40, cutoff=1.0) == [(4, 20)]  # only the best


def test_the_default_lookback_reads_no_window_far_below_the_best():
    """One window holds every word of the question; the rest share one of them: look-back 512 reads the
    best windows and none scoring below half of the best (with cutoff 0 it fills its 512 tokens)."""
    tokenizer = tiny_tokenizer()
    filler = "the man was at the river with his fish and the old book by the door . " * 40
    text = filler + "the secret code of the blue door is angler . " + filler
    ids = np.array(tokenizer(text, add_special_tokens=False).input_ids, dtype=np.int32)
    wins = windows(0, len(ids), 32)
    view = Candidates(ids, wins, "what is the secret code of the blue door ?", tokenizer)
    scores = bm25_scores(view)
    default = choose_spans(scores, wins, 512, LookBack(512).cutoff)
    assert sum(b - a for a, b in default) < 100 and any("angler" in tokenizer.decode(ids[a:b]) for a, b in default)
    assert sum(b - a for a, b in choose_spans(scores, wins, 512, 0.0)) == 512


def test_bench_quality_answers_every_lookback_variant_from_one_reading(tmp_path):
    import importlib.util
    import json

    from tiny_models import text_file

    from nugget2d.runtime.bench_quality import QualityOptions, run_quality

    options = QualityOptions(
        methods=["full", "nugget2d"],
        ratios=[0.25],
        contexts=[200],
        metrics=["qa"],
        depths=[0.5],
        qa_samples=1,
        inputs=[str(text_file(tmp_path))],
        lookback=[0, 32],
        lookback_selectors=["bm25", "attention"],
    )
    config = Nugget2DConfig(scorer_layer=1, allocation="head")  # per head: text positions, so attention runs
    model = Nugget2DModel.from_base(tiny_llama(max_position_embeddings=1024), config).eval()
    path = run_quality(model, tiny_tokenizer(), options, tmp_path / "run", adapter="none")
    records = json.loads(path.read_text())["records"]
    variants = sorted((r["method"], r.get("lookback", 0), r.get("lookback_selector", "")) for r in records)
    assert variants == [("full", 0, ""), ("nugget2d", 0, ""), ("nugget2d", 32, "attention"), ("nugget2d", 32, "bm25")]
    for record in records:
        assert (
            record["seconds_per_answer"] > 0 and record["peak_question_bytes"] > 0 and len(record["qa_examples"]) == 1
        )
        assert 0 < record["first_token_seconds"] <= record["seconds_per_answer"] and record["answer_tokens"] >= 1
    looked = [r for r in records if r.get("lookback")]
    assert all(0 < r["lookback_read_tokens"] <= 32 for r in looked)
    plain = next(r for r in records if r["method"] == "nugget2d" and not r.get("lookback"))
    assert all(r["cache_bytes"] == plain["cache_bytes"] for r in looked)  # the same resident cache
    spec = importlib.util.spec_from_file_location("lookback_table", "benchmarks/lookback/table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    lines = table.rows(tmp_path)
    assert len(lines) == 2 + 4 and "| run | 200 | nugget2d | 32 | bm25 | auto: after | 0.5 | " in "\n".join(lines)
    with pytest.raises(ValueError, match="look-back selector must be one of"):
        QualityOptions(methods=["nugget2d"], ratios=[0.25], contexts=[200], lookback_selectors=["magic"])
    with pytest.raises(ValueError, match="lookback must be a whole number of tokens >= 0"):
        QualityOptions(methods=["nugget2d"], ratios=[0.25], contexts=[200], lookback=[-1])
    with pytest.raises(ValueError, match="look-back cutoff must be a share"):
        QualityOptions(methods=["nugget2d"], ratios=[0.25], contexts=[200], lookback_cutoff=-0.1)
