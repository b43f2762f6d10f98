"""Training examples per objective: what is compressed, what stays raw, what is learned."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import text_file, tiny_llama, tiny_tokenizer

from nugget2d.compress import Nugget2DConfig, Nugget2DModel
from nugget2d.compress.rope import rerotate
from nugget2d.runtime.objectives import NuggetObjective
from nugget2d.runtime.session import StreamingSession, StreamSettings, token_log_probs
from nugget2d.runtime.train import TrainConfig
from nugget2d.runtime.train_data import Shape, build_examples, collate, parse_mix
from nugget2d.runtime.train_exclude import ExcludedText

WORDS = "the old angler said that the river was good for fish . she had a blue book and he had an old door ."


@pytest.fixture
def book(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text((WORDS + " ") * 12)
    return path


@pytest.fixture
def rows(tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        "\n".join(
            json.dumps({"context": WORDS * 2, "question": "what had she", "answer": "a blue book"}) for _ in range(6)
        )
    )
    summaries = tmp_path / "sum.jsonl"
    summaries.write_text(json.dumps({"document": WORDS * 3, "summary": "the angler had a book"}) + "\n")
    return qa, summaries


def test_recall_examples_ask_for_the_passage_again_after_a_distractor(book):
    tokenizer = tiny_tokenizer()
    shape = Shape(segment=16, target=6, recent=5, sinks=2)
    examples = build_examples([book], tokenizer, "recall", shape)
    assert examples
    for e in examples:
        assert len(e.sinks) == 2 and len(e.recent) == 4 and len(e.prompt) == 1 and len(e.target) == 6
        passage = e.context[: len(e.target)]
        assert e.target == passage  # the text right after the sinks, read again
        assert len(e.context) > 16  # passage and distractor are both compressed


def test_more_distractors_put_the_recalled_passage_farther_back(book):
    """``distractors`` segments are compressed between a passage and its recall (and a planted fact and
    its question): the passage is the same, the compressed context grows by whole segments, and the
    raw window is the start of the segment after them. Zero distractors is refused with a clear error."""
    tokenizer = tiny_tokenizer()
    near = build_examples([book], tokenizer, "recall", Shape(segment=16, target=6, recent=5, sinks=2))
    far = build_examples([book], tokenizer, "recall", Shape(segment=16, target=6, recent=5, sinks=2, distractors=3))
    assert len(far) == len(near) - 2  # two more segments per example
    for a, b in zip(near, far):
        assert (a.sinks, a.target) == (b.sinks, b.target)
        assert b.context[: len(a.context)] == a.context and len(b.context) > len(a.context) + 16
        assert b.recent != a.recent

    import random

    from nugget2d.runtime.facts import random_fact_qa
    from nugget2d.runtime.train_data import fact_examples

    fact = random_fact_qa(random.Random(0))
    segments = [(list(range(10 * k, 10 * k + 10)), [(fact, 5)]) for k in range(1, 5)] + [(list(range(90, 94)), [])]
    examples = fact_examples(
        segments, Shape(segment=10, target=4, recent=3, sinks=2, distractors=2), lambda q, a: ((7,), (8, 9))
    )
    # windows: segments 1-3 compressed with 4 raw (3 facts asked), then 2-4 with 5 raw (3 more)
    assert len(examples) == 6
    assert examples[0].context == tuple(range(12, 40)) and examples[0].recent == (40, 41, 42)
    assert examples[3].context == tuple(range(22, 50)) and examples[3].recent == (90, 91, 92)
    with pytest.raises(ValueError, match="--distractors must be >= 1"):
        TrainConfig(data=[str(book)], objective="recall", distractors=0)


def test_excluded_text_is_never_read(tmp_path):
    """``--exclude`` (say, the texts a model is evaluated on): no example of any objective reads a run
    of tokens from them, every example that stays is one built without it too (the same planted
    facts), and excluding everything, or a path that is not there, is a clear error."""
    tokenizer = tiny_tokenizer()
    book = text_file(tmp_path, 1500)
    held = tmp_path / "held"
    held.mkdir()
    (held / "eval.txt").write_text(" ".join(book.read_text().split()[600:900]))
    exclude = ExcludedText.from_paths([held], tokenizer)
    shape = Shape(segment=48, target=8, recent=4, sinks=2)
    for objective in ("continue", "recall", "facts"):
        every = build_examples([book], tokenizer, objective, shape, plant_facts=1)
        kept = build_examples([book], tokenizer, objective, shape, plant_facts=1, exclude=exclude)
        assert 0 < len(kept) < len(every) and set(kept) <= set(every)
        assert any(exclude.overlaps(e.sinks + e.context + e.recent) for e in every)
        assert not any(exclude.overlaps(e.sinks + e.context + e.recent + e.target) for e in kept)
    mixed = build_examples([book], tokenizer, "mix", shape, parse_mix("continue=1,recall=1"), exclude=exclude)
    assert mixed and not any(exclude.overlaps(e.sinks + e.context + e.recent) for e in mixed)
    with pytest.raises(ValueError, match="once --exclude left out"):
        build_examples([book], tokenizer, "recall", shape, exclude=ExcludedText.from_paths([book], tokenizer))
    with pytest.raises(ValueError, match="--exclude: .*not found"):
        ExcludedText.from_paths([tmp_path / "nowhere"], tokenizer)
    with pytest.raises(ValueError, match="--exclude: .*not found"):  # refused before a model is loaded
        TrainConfig(data=[str(book)], objective="recall", exclude=[str(tmp_path / "nowhere")])


def test_hybrid_continue_keeps_sinks_and_the_recent_window_raw(book):
    tokenizer = tiny_tokenizer()
    ids = tokenizer(book.read_text(), add_special_tokens=False).input_ids
    examples = build_examples([book], tokenizer, "continue", Shape(segment=16, target=5, recent=4, sinks=2))
    first = examples[0]
    stream = first.sinks + first.context + first.recent + first.prompt + first.target
    assert list(stream) == ids[: len(stream)]  # in text order, nothing skipped
    assert (len(first.sinks), len(first.recent), len(first.prompt), len(first.target)) == (2, 3, 1, 5)
    plain = build_examples([book], tokenizer, "continue", Shape(segment=16, target=5))[0]
    assert plain.sinks == plain.recent == () and len(plain.prompt) == 1
    assert list(plain.context + plain.prompt + plain.target) == ids[: len(plain.context) + 6]


def test_qa_and_summary_rows_are_read_with_datasets(rows):
    tokenizer = tiny_tokenizer()
    qa, summaries = rows
    examples = build_examples([qa], tokenizer, "qa", Shape())
    assert len(examples) == 6 and all(e.objective == "qa" for e in examples)
    answer = tokenizer("a blue book", add_special_tokens=False).input_ids
    assert list(examples[0].target) == answer + [tokenizer.eos_token_id]
    assert "what had she" in tokenizer.decode(examples[0].prompt)
    (summary,) = build_examples([summaries], tokenizer, "summarize", Shape())
    assert list(summary.context) == tokenizer(WORDS * 3, add_special_tokens=False).input_ids


def test_bad_jsonl_gets_a_message_naming_the_problem(tmp_path, rows):
    tokenizer = tiny_tokenizer()
    qa, summaries = rows
    with pytest.raises(ValueError, match=r"need the fields.*lack \['context', 'question', 'answer'\]"):
        build_examples([summaries], tokenizer, "qa", Shape())
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"context": "a", "question": \n')
    with pytest.raises(ValueError, match="could not read qa rows"):
        build_examples([broken], tokenizer, "qa", Shape())
    with pytest.raises(ValueError, match="no .jsonl files"):
        build_examples([_plain_text(tmp_path)], tokenizer, "qa", Shape())


def _plain_text(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text(WORDS)
    return path


def test_mix_draws_objectives_by_weight(book, rows):
    tokenizer = tiny_tokenizer()
    data = [book, rows[0]]
    examples = build_examples(data, tokenizer, "mix", Shape(segment=16, target=5), parse_mix("continue=3,qa=1"))
    counts = {name: sum(e.objective == name for e in examples) for name in ("continue", "qa")}
    assert counts["continue"] == pytest.approx(3 * counts["qa"], rel=0.2)
    again = build_examples(data, tokenizer, "mix", Shape(segment=16, target=5), parse_mix("continue=3,qa=1"))
    assert again == examples  # seeded
    with pytest.raises(ValueError, match="unknown objective 'copy'"):
        build_examples(data, tokenizer, "mix", Shape(), {"copy": 1.0})
    with pytest.raises(ValueError, match="NAME=WEIGHT"):
        parse_mix("continue:1")
    with pytest.raises(ValueError, match="goes with --objective mix"):
        TrainConfig(data=[str(book)], objective="mix")


def test_collate_labels_only_the_targets(book):
    tokenizer = tiny_tokenizer()
    examples = build_examples([book], tokenizer, "recall", Shape(segment=16, target=6, recent=5, sinks=2))[:3]
    batch = collate(examples, pad_id=0)
    assert set(batch) >= {"sinks", "sinks_mask", "recent", "recent_mask"}
    for row, e in enumerate(examples):
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert labelled == list(e.target)
    plain = collate(build_examples([book], tokenizer, "autoencode", Shape(segment=16))[:2], pad_id=0)
    assert "sinks" not in plain and "recent" not in plain


def test_autoencoding_reads_the_segment_as_a_session_holds_it(book):
    tokenizer = tiny_tokenizer()
    examples = build_examples([book], tokenizer, "autoencode", Shape(segment=16, sinks=2, recent=3))
    assert examples
    for e in examples:  # raw sinks, nuggets of the middle, raw recent tokens: then all of it again
        assert len(e.sinks) == 2 and len(e.recent) == 3 and e.sinks + e.context + e.recent == e.target


def _hybrid_cache(objective: NuggetObjective, batch: dict):
    """The [sinks | nuggets | recent] cache the objective builds for a collated batch."""
    fields = ("context", "context_mask", "sinks", "sinks_mask", "recent", "recent_mask")
    return objective.cache(*(batch[name] for name in fields))


def test_the_hybrid_training_cache_matches_a_sessions_layout(book):
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = Nugget2DModel.from_base(tiny_llama(), Nugget2DConfig(ratio=0.25, scorer_layer=1, lora_rank=4))
    objective = NuggetObjective(model)
    examples = build_examples([book], tokenizer, "recall", Shape(segment=16, target=6, recent=5, sinks=2))[:2]
    batch = collate(examples, pad_id=0)
    cache = _hybrid_cache(objective, batch)
    for row, e in enumerate(examples):
        nuggets = math.ceil(len(e.context) * 0.25)
        assert int(cache.nugget_counts()[row]) == nuggets
        assert int(cache.entry_counts()[row]) == 2 + nuggets + 4
    loss = objective(**batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.scorer.parameters())


@pytest.mark.parametrize("allocation", ["head", "token"])
def test_training_reads_the_cache_a_session_holds_of_the_same_text(book, allocation):
    """An autoencoding example's target, read over the cache its objective builds, gets the
    log-probabilities a session gives it after reading the example's text: the raw window read over
    the whole text, then the middle compressed (per head with the recent queries voting, or per token)."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = Nugget2DConfig(ratio=0.25, scorer_layer=1, lora_rank=4, allocation=allocation, positions="original")
    model = Nugget2DModel.from_base(tiny_llama(), config)
    example = build_examples([book], tokenizer, "autoencode", Shape(segment=16, sinks=2, recent=3))[1]
    batch = collate([example], pad_id=0)
    decoded = list(example.prompt + example.target)
    with torch.no_grad():
        cache = _hybrid_cache(NuggetObjective(model), batch)
        trained = token_log_probs(model(batch["input_ids"], nuggets=cache).logits[0, :-1], decoded[1:])
    settings = StreamSettings(ratio=0.25, budget=256, recent=3, segment=64, sinks=2, positions="original")
    session = StreamingSession(model, tokenizer, settings, chat=False)
    session.ingest_formatted(example.sinks + example.context + example.recent, final=True)
    read = session.score_ids(decoded)
    assert int(cache.nugget_counts()[0]) == session.nuggets == math.ceil(len(example.context) * 0.25)
    torch.testing.assert_close(read, trained, atol=1e-4, rtol=1e-4)


def _training_cache(book, positions: str):
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = Nugget2DConfig(ratio=0.25, scorer_layer=1, lora_rank=4, positions=positions)
    model = Nugget2DModel.from_base(tiny_llama(), config)
    example = build_examples([book], tokenizer, "continue", Shape(segment=16, target=6, recent=5, sinks=2))[0]
    batch = collate([example], pad_id=0)
    cache = _hybrid_cache(NuggetObjective(model), batch)
    return model, example, cache


def test_the_training_cache_numbers_entries_as_a_session_does(book):
    """With cache positions (the sessions' default) the reader sees sinks, nuggets and recent tokens
    at 0, 1, 2, ... with the nuggets' keys re-rotated there; original positions keep text positions."""
    model, example, by_cache = _training_cache(book, "cache")
    _, _, by_text = _training_cache(book, "original")
    nuggets = math.ceil(len(example.context) * 0.25)
    entries = 2 + nuggets + len(example.recent)
    assert by_cache.layers[0].positions[0].tolist() == list(range(entries))
    text = by_text.layers[0].positions[0, : 2 + nuggets]
    assert text[:2].tolist() == [0, 1] and bool((text.diff() > 0).all())
    assert int(text[-1]) == 2 + len(example.context) - 1  # a segment's last token is always kept
    assert int(by_text.layers[0].positions[0, -1]) == 2 + len(example.context) + len(example.recent) - 1
    kept = slice(0, 2 + nuggets)  # sinks and nuggets: same encoder keys, only rotated elsewhere
    for cached, original in zip(by_cache.layers, by_text.layers):
        delta = cached.positions[:, kept] - original.positions[:, kept]
        moved = rerotate(original.keys[:, :, kept], delta, model.rotary_emb)
        torch.testing.assert_close(cached.keys[:, :, kept], moved, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cached.values[:, :, kept], original.values[:, :, kept])


def test_planted_facts_keep_segments_their_length_are_seeded_and_never_use_a_benchmarks_template(book):
    """``plant_facts`` puts that many synthetic facts in every scorer segment (the segment keeps its
    length), the same ones for the same seed; no fact is phrased as the benchmarks ask (planted-fact QA's
    secret door code, RULER's magic number), so a scorer trained on them is not tuned on the tests."""
    import random

    from nugget2d.runtime.facts import QUESTIONS, TEMPLATES, random_fact

    tokenizer = tiny_tokenizer()
    shape = Shape(segment=48, target=8)
    plain = build_examples([book], tokenizer, "scorer", shape)
    planted = build_examples([book], tokenizer, "scorer", shape, seed=3, plant_facts=2)
    again = build_examples([book], tokenizer, "scorer", shape, seed=3, plant_facts=2)
    other = build_examples([book], tokenizer, "scorer", shape, seed=4, plant_facts=2)
    assert [len(e.context) for e in planted] == [len(e.context) for e in plain]
    assert planted == again and planted != other
    unknown = tokenizer.unk_token_id  # the tiny vocabulary has no names or digits: a fact reads as <unk>s
    for p, e in zip(planted, plain):
        assert unknown not in e.context and p.context.count(unknown) >= 2 * 3
        assert p.target == p.context  # the scorer's importance pass repeats the planted text
    facts = [random_fact(random.Random(seed)) for seed in range(200)]
    assert len(set(facts)) > 150 and all(any(ch.isdigit() or ch.isupper() for ch in f[1:]) for f in facts)
    for text in [*TEMPLATES, *facts, *(text for pair in QUESTIONS for text in pair)]:
        assert "secret code" not in text and "magic number" not in text
    with pytest.raises(ValueError, match="--plant-facts must be >= 0"):
        TrainConfig(data=[str(book)], objective="scorer", plant_facts=-1)


def test_planted_facts_are_located_and_asked_about_where_the_cache_compresses_them(book):
    """``facts`` examples plant the same facts as the other objectives (same seed, same tokens), and
    ask about each fact only where it is compressed: past the sinks of the first segment, or in the
    distractor segment after it; the answer (then the end of the turn) is learned after the chat
    question. Without planted facts there is nothing to ask: a clear error."""
    import random

    from nugget2d.runtime.facts import fact_ids, plant_located_facts, plant_random_facts, random_fact, random_fact_qa
    from nugget2d.runtime.train_data import fact_examples

    tokenizer = tiny_tokenizer()
    ids = tokenizer((WORDS + " ") * 3, add_special_tokens=False).input_ids
    planted, located = plant_located_facts(tokenizer, ids, 2, random.Random(5))
    assert planted == plant_random_facts(tokenizer, ids, 2, random.Random(5))
    assert len(located) == 2
    for fact, start in located:
        assert planted[start : start + len(fact_ids(tokenizer, fact.statement))] == fact_ids(tokenizer, fact.statement)
    for seed in range(20):  # the question's fact is the statement the scorer recipe always planted
        fact = random_fact_qa(random.Random(seed))
        assert fact.statement == random_fact(random.Random(seed)) and fact.question.endswith("?")
        assert fact.answer.rstrip(".").split()[-1] in fact.statement

    fact = random_fact_qa(random.Random(0))
    segments = [
        (list(range(10, 20)), [(fact, 1), (fact, 5)]),  # the fact at 1 lies in the sinks: not asked
        (list(range(20, 30)), [(fact, 0)]),
        (list(range(30, 40)), [(fact, 9)]),
        (list(range(40, 42)), []),  # shorter than the raw window: no example reads it raw
    ]
    examples = fact_examples(segments, Shape(segment=10, target=4, recent=3, sinks=2), lambda q, a: ((7,), (8, 9)))
    assert len(examples) == 2  # one fact past the sinks and one in the distractor; the next triple has no window
    first = examples[0]
    assert first.sinks == (10, 11) and first.context == tuple(range(12, 30)) and first.recent == (30, 31, 32)
    assert (first.prompt, first.target, first.objective) == ((7,), (8, 9), "facts")

    shape = Shape(segment=48, target=8, recent=4, sinks=2)
    built = build_examples([book], tokenizer, "facts", shape, plant_facts=1)
    assert built and all(e.target[-1] == tokenizer.eos_token_id and len(e.recent) == 4 for e in built)
    with pytest.raises(ValueError, match="--plant-facts 1"):
        build_examples([book], tokenizer, "facts", shape)
    with pytest.raises(ValueError, match="--plant-facts 1"):
        build_examples([book], tokenizer, "mix", shape, parse_mix("continue=1,facts=1"))
    with pytest.raises(ValueError, match="--plant-facts 1"):  # refused before a model is loaded
        TrainConfig(data=[str(book)], objective="mix", mix="continue=1,facts=1")


def test_a_short_answer_weighs_as_much_as_a_long_target_in_the_loss(book):
    """In a batch with ``facts`` examples each example's target weighs the same: the batch's loss is
    the mean of each example's own loss (cross-entropy and KL), not a token mean that a continuation's
    64 tokens would drown a 10-token answer in; batches without them keep the token mean."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = Nugget2DModel.from_base(tiny_llama(), Nugget2DConfig(ratio=0.25, scorer_layer=1, lora_rank=4))
    objective = NuggetObjective(model, "ce+kl")
    shape = Shape(segment=24, target=8, recent=4, sinks=2)
    answer = build_examples([book], tokenizer, "facts", shape, plant_facts=1)[0]
    passage = build_examples([book], tokenizer, "recall", shape)[0]
    assert len(answer.target) != len(passage.target)
    batch = collate([answer, passage], pad_id=0)
    weights = batch["label_weights"]
    assert torch.allclose(weights.sum(dim=1), torch.ones(2)) and bool((weights[batch["labels"] == -100] == 0).all())
    assert "label_weights" not in collate([passage, passage], pad_id=0)
    with torch.no_grad():
        both = objective.losses(**batch)
        alone = [objective.losses(**collate([e], pad_id=0)) for e in (answer, passage)]
    for part in ("ce", "kl"):
        torch.testing.assert_close(both[part], (alone[0][part] + alone[1][part]) / 2, atol=1e-4, rtol=1e-4)


def test_the_model_cards_command_lists_each_excluded_path_as_the_shell_takes_it():
    from nugget2d.runtime.model_card import command

    config = {"data": ["a.txt"], "exclude": ["test/", "b.txt"], "seed": 2, "resume": True, "plant_facts": 0}
    defaults = {"exclude": [], "seed": 0, "plant_facts": 0}
    assert command(config, defaults) == "nugget2d train --data a.txt --exclude test/ b.txt --seed 2"
