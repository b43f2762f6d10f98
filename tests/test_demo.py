"""`nugget2d demo`: its code path end to end on a tiny model (slow), and on the embedded default model
(slow: loads SmolLM2-135M)."""

from __future__ import annotations

import io
import re

import pytest
from tiny_models import WORDS, save_tiny_model

from nugget2d.runtime.demo import QUESTIONS, run_demo
from nugget2d.runtime.generation import GenerationSettings


@pytest.mark.slow
def test_demo_on_a_tiny_model_shows_token_progress_answers_and_savings(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "tiny")
    text = " ".join(WORDS[i % 40] for i in range(150))
    out = io.StringIO()
    nuggets, full = run_demo(
        100,
        ratio=0.25,
        model=str(model),
        adapter="none",
        budget=64,
        questions=("who is the angler ?", "what is the secret code ?"),
        out=out,
        settings=GenerationSettings(max_new_tokens=6, no_repeat_ngram=3, stop=("\n\n",)),
        text=text,
    )
    printed, bar = out.getvalue(), capsys.readouterr().err
    assert re.search(r"\d+/\d+ \[", bar) and "tok/s" in bar  # the bar counts tokens and shows their rate
    assert nuggets.cache_tokens <= 64 < full.cache_tokens and nuggets.cache_bytes < full.cache_bytes
    assert len(nuggets.answers) == len(full.answers) == 2 and len(full.answer_seconds) == 2
    assert printed.count("Q: who is the angler ?") == 2  # the nugget2d answer is shown again beside full KV's
    saved = re.search(r"\((\d+\.\d)x more, (\d+)% saved\)", printed)
    assert saved and float(saved.group(1)) == pytest.approx(full.cache_bytes / nuggets.cache_bytes, abs=0.05)


@pytest.mark.slow
def test_demo_past_the_window_says_why_full_kv_is_not_run(tmp_path):
    model = save_tiny_model(tmp_path / "tiny")
    text = " ".join(WORDS[i % 40] for i in range(600))
    out = io.StringIO()
    runs = run_demo(None, 0.25, 4, str(model), "none", budget=64, questions=("who ?",), out=out, text=text)
    assert len(runs) == 1 and "[full KV] not run" in out.getvalue() and "would take" in out.getvalue()


@pytest.mark.slow
def test_demo_answers_with_a_smaller_cache():
    out = io.StringIO()
    nuggets, full = run_demo(context_tokens=768, ratio=0.1, max_new_tokens=8, budget=384, out=out)
    assert full.cache_tokens > 768 and nuggets.cache_tokens <= 384
    assert nuggets.cache_bytes < 0.5 * full.cache_bytes
    assert len(nuggets.answers) == len(full.answers) == len(QUESTIONS)
    assert "tok/s" in out.getvalue() and "saved" in out.getvalue()


def test_sampling_flags_turn_on_no_repeat_ngrams_and_the_blank_line_stop():
    from nugget2d.runtime.cli import build_parser
    from nugget2d.runtime.cli_options import generation_settings

    args = build_parser().parse_args(
        ["generate", "--input", "x", "--prompt", "q", "--no-repeat-ngram", "3", "--stop-at-blank-line"]
    )
    settings = generation_settings(args)
    assert settings.no_repeat_ngram == 3 and "\n\n" in settings.stop
    with pytest.raises(ValueError, match="no_repeat_ngram"):
        GenerationSettings(no_repeat_ngram=-1)


def test_no_repeat_ngram_keeps_greedy_answers_from_looping():
    import torch
    from tiny_models import tiny_llama, tiny_tokenizer

    from nugget2d.compress import Nugget2DConfig, Nugget2DModel
    from nugget2d.runtime.session import CacheConfig, StreamingSession

    model = Nugget2DModel.from_base(tiny_llama(), Nugget2DConfig(scorer_layer=1)).eval()
    session = StreamingSession(model, tiny_tokenizer(), CacheConfig(ratio=0.25, budget=96, recent=16, segment=16))
    session.ingest_ids(torch.randint(3, 90, (64,), generator=torch.Generator().manual_seed(0)).tolist())
    prompt = [5, 6, 7]
    plain = list(session.fork().ask_ids(prompt, GenerationSettings(max_new_tokens=30, ignore_eos=True)))
    kept = list(session.fork().ask_ids(prompt, GenerationSettings(30, ignore_eos=True, no_repeat_ngram=2)))
    bigrams = list(zip(prompt + kept, (prompt + kept)[1:]))
    assert len(plain) == len(kept) == 30 and len(bigrams) == len(set(bigrams))


def test_a_question_too_long_for_the_cache_is_refused_before_reading(tmp_path):
    model = save_tiny_model(tmp_path / "tiny")
    out = io.StringIO()
    with pytest.raises(ValueError, match="does not fit the cache budget"):
        run_demo(100, 0.25, 8, str(model), "none", budget=64, questions=("the " * 80,), out=out, text="a " * 200)
    assert "reading" not in out.getvalue()
