"""``bench quality --metrics ruler``: RULER samples and scores from lm-eval itself, every method answering
the same prompts with the question read after the context."""

from __future__ import annotations

import json
import math
import random
import sys

import pytest
from tiny_models import tiny_llama, tiny_tokenizer

from nugget2d.compress import Nugget2DConfig, Nugget2DModel
from nugget2d.runtime import bench_ruler
from nugget2d.runtime.bench_quality import QualityOptions, run_quality
from nugget2d.runtime.cli import main


def test_split_prompt_puts_the_last_line_after_the_context():
    context, question = bench_ruler.split_prompt("intro\nhay hay\nWhat is it? The answer is")
    assert (context, question) == ("intro\nhay hay\n", "What is it? The answer is")
    with pytest.raises(ValueError, match="no line break"):
        bench_ruler.split_prompt("one line only")


def test_tasks_that_need_downloads_or_do_not_exist_are_refused_by_name():
    with pytest.raises(ValueError, match="niah_single_2 reads a data set lm-eval downloads"):
        bench_ruler.check_tasks(["niah_single_1", "niah_single_2"])
    with pytest.raises(ValueError, match="unknown RULER task 'niah_single_9'"):
        QualityOptions(methods=["full"], ratios=[0.1], contexts=[512], metrics=["ruler"], ruler_tasks=["niah_single_9"])


def test_rulers_short_names_are_lm_evals_ruler_prefixed_tasks():
    pytest.importorskip("lm_eval", reason="lm-eval is the optional `eval` extra: pip install 'nugget2d[eval]'")
    import lm_eval.tasks

    assert bench_ruler.check_tasks(["vt", "cwe", "fwe", "niah_single_1"]) == [
        "ruler_vt",
        "ruler_cwe",
        "ruler_fwe",
        "niah_single_1",
    ]
    with pytest.raises(ValueError, match="ruler_qa_squad reads a data set"):
        bench_ruler.check_tasks(["qa_squad"])
    registered = lm_eval.tasks.TaskManager().all_tasks
    assert set(bench_ruler.TASKS) | set(bench_ruler.NEEDS_DOWNLOAD) <= set(registered)  # lm-eval's own names


def test_without_lm_eval_the_ruler_metric_names_the_extra_before_any_model_loads(monkeypatch, tiny_model_dir, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    args = ["bench", "quality", "--model", str(tiny_model_dir), "--metrics", "ruler", "--out", "unused"]
    assert main(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--metrics ruler needs lm-eval" in err[0] and "nugget2d[eval]" in err[0]


def test_without_nltks_sentence_model_the_ruler_metric_says_how_to_install_it(monkeypatch, tiny_model_dir, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional `eval` extra: pip install 'nugget2d[eval]'")
    from nugget2d.runtime import install_punkt

    monkeypatch.setattr(install_punkt, "punkt_tab_found", lambda: False)
    args = ["bench", "quality", "--model", str(tiny_model_dir), "--metrics", "ruler", "--out", "unused"]
    assert main(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "python -m nugget2d.runtime.install_punkt" in err[0]


def test_nltks_sentence_model_is_installed_with_the_eval_extra():
    pytest.importorskip("lm_eval", reason="lm-eval is the optional `eval` extra: pip install 'nugget2d[eval]'")
    from nltk.tokenize import sent_tokenize

    from nugget2d.runtime.install_punkt import punkt_tab_found

    assert punkt_tab_found(), "run `python -m nugget2d.runtime.install_punkt` (make install does)"
    assert sent_tokenize("Mr. Smith went to Washington. He arrived at noon.") == [
        "Mr. Smith went to Washington.",
        "He arrived at noon.",
    ]


@pytest.mark.slow
def test_ruler_records_score_every_method_on_lm_evals_own_samples(tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional `eval` extra: pip install 'nugget2d[eval]'")
    tokenizer = tiny_tokenizer()
    samples = bench_ruler.samples(tokenizer, ["niah_single_1"], [512], 2)
    assert [(s.task, s.length, s.index) for s in samples] == [("niah_single_1", 512, 0), ("niah_single_1", 512, 1)]
    random.seed(5)
    again = bench_ruler.samples(tokenizer, ["niah_single_1"], [512], 2)  # lm-eval's seeds, whatever came before
    assert [(s.context, s.question) for s in again] == [(s.context, s.question) for s in samples]
    assert random.random() == random.Random(5).random()  # the caller's random state is left as it was
    for sample in samples:  # RULER's metric, through lm-eval's process_results
        assert sample.score(f"it is {sample.answers[0]}.") == 1.0 and sample.score("it is 11.") == 0.0
        assert sample.answers[0] not in sample.question and sample.answers[0] in sample.context
        context, tail = sample.split_ids(tokenizer)
        assert context + tail == tokenizer(sample.context + sample.question).input_ids
        assert tokenizer.decode(tail) == tokenizer.decode(tokenizer(sample.question).input_ids)
        assert [len(part) for part in sample.split_ids(tokenizer, raw_tail=7)] == [len(context) + len(tail) - 7, 7]
    model = Nugget2DModel.from_base(tiny_llama(), Nugget2DConfig(scorer_layer=1)).eval()
    options = QualityOptions(
        methods=["full", "streaming", "nugget2d"],
        ratios=[0.25],
        contexts=[512],
        metrics=["ruler"],
        ruler_samples=2,
        ruler_new_tokens=4,
    )
    data = json.loads(run_quality(model, tokenizer, options, tmp_path, adapter="none").read_text())
    records = {r["method"]: r for r in data["records"]}
    assert set(records) == {"full", "streaming", "nugget2d"}
    for record in records.values():
        assert set(record["ruler"]) == {"niah_single_1"} and record["ruler_samples"] == 2
        assert 0 <= record["ruler_score"] <= 1 and [a["index"] for a in record["ruler_answers"]] == [0, 1]
        assert record["ruler_score"] == sum(a["score"] for a in record["ruler_answers"]) / 2
    context = sum(len(sample.split_ids(tokenizer)[0]) for sample in samples) / 2
    assert records["streaming"]["cache_tokens"] == math.ceil(0.25 * 512)  # sized for RULER's length, as a server is
    assert records["nugget2d"]["cache_tokens"] <= math.ceil(0.25 * 512)
    assert records["full"]["cache_tokens"] >= context == records["full"]["ruler_context_tokens"]
