"""``kvpress:<Press>`` reference methods of ``bench quality`` (issue 11): refused clearly without the
``peers`` extra, and, with kvpress installed, scored on the same windows as the other methods."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import transformers
from tiny_models import text_file

from nugget2d.runtime import bench_peers
from nugget2d.runtime.bench_common import CacheShape
from nugget2d.runtime.bench_quality import QualityOptions, perplexities, run_quality
from nugget2d.runtime.bench_speed import SpeedOptions
from nugget2d.runtime.cli import main

SMALL = dict(ratios=[0.25], contexts=[96], samples=2, continuation=16, passage=32, repeat=16)


def test_unknown_press_names_are_refused_with_the_list():
    with pytest.raises(ValueError, match="kvpress:ExpectedAttention.*kvpress:KVzip.*kvpress:SnapKV.*StreamingLLM"):
        QualityOptions(methods=["full", "kvpress:H2O"], **SMALL)
    assert bench_peers.press_class_name("kvpress:KVzip") == "KVzipPress"


def test_presses_are_refused_by_bench_speed():
    with pytest.raises(ValueError, match="bench quality` only"):
        SpeedOptions(methods=["full", "kvpress:KVzip"], ratios=[0.1], contexts=[64])


def test_without_kvpress_one_line_names_the_extra_before_any_model_loads(monkeypatch, tiny_model_dir, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "kvpress", None)  # `import kvpress` now raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'nugget2d\[peers\]'"):
        QualityOptions(methods=["full", "kvpress:KVzip"], **SMALL)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("nugget2d.runtime.loading.load_nugget2d", no_model)
    args = ["bench", "quality", "--model", str(tiny_model_dir), "--methods", "full,kvpress:SnapKV"]
    assert main([*args, "--input", str(text_file(tmp_path)), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kvpress:SnapKV needs kvpress" in err[0] and "pip install 'nugget2d[peers]'" in err[0]


def test_a_transformers_kvpress_cannot_run_on_is_named_with_the_fix():
    bench_peers.check_transformers("kvpress:SnapKV", "5.23.0")
    with pytest.raises(ValueError, match=r"transformers 5.24.0 renamed.*pip install 'transformers<5.24'"):
        bench_peers.check_transformers("kvpress:SnapKV", "5.24.0")
    for installed in ("5.23.1", "5.2.0", "4.57.0.dev0", "5.23.0+cpu"):
        bench_peers.check_transformers("kvpress:SnapKV", installed)
    for installed in ("5.24.0.dev0", "5.24.0rc1", "5.25.0", "6.0.0"):  # 5.24's pre-releases count as 5.24
        with pytest.raises(ValueError, match=f"transformers {installed} renamed"):
            bench_peers.check_transformers("kvpress:SnapKV", installed)
    with pytest.raises(ValueError, match="Invalid version"):
        bench_peers.check_transformers("kvpress:SnapKV", "five")


# --- with kvpress installed -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    pytest.importorskip("kvpress", reason="kvpress is the optional `peers` extra: pip install 'nugget2d[peers]'")
    try:
        bench_peers.check_transformers("kvpress", transformers.__version__)
    except ValueError as err:
        pytest.skip(str(err))
    from nugget2d.runtime.loading import load_nugget2d

    model, tokenizer = load_nugget2d(str(tiny_model_dir), "none")
    return model, tokenizer, bench_peers.PressRunner.for_model(model)


@pytest.mark.parametrize("press", ["StreamingLLM", "KVzip"])
def test_a_press_keeping_everything_scores_like_full_kv(loaded, press):
    model, tokenizer, runner = loaded
    options = QualityOptions(methods=["full"], metrics=["ppl", "recall_ppl"], **SMALL)
    window = torch.randint(3, 90, (112,), generator=torch.Generator().manual_seed(2)).tolist()
    full = perplexities(model, tokenizer, CacheShape("full", 1.0, 96, reserve=17), window, options)
    kept = runner.perplexities(f"kvpress:{press}", 1.0, window, 96, options)  # compression_ratio 0
    for metric in ("ppl", "recall_ppl"):
        assert kept[metric][1] == full[metric][1] == 16
        assert math.isclose(kept[metric][0], full[metric][0], rel_tol=1e-4), metric
    assert kept["cache_tokens"] == 95 and kept["cache_bytes"] == kept["cache_bytes_unmasked"] > 0


def test_presses_run_in_bench_quality_beside_the_other_methods(loaded, tmp_path):
    model, tokenizer, _ = loaded
    methods = ["full", "streaming", "kvpress:StreamingLLM", "kvpress:KVzip"]
    options = QualityOptions(
        methods=methods, metrics=["ppl", "recall_ppl", "bleu"], ae_tokens=40, ae_samples=1, **SMALL,
        inputs=[str(text_file(tmp_path))],
    )  # fmt: skip
    path = run_quality(model, tokenizer, options, tmp_path / "out", adapter="none")
    data = json.loads(path.read_text())
    assert data["kvpress"]["version"] and "cache_bytes" in data["kvpress"]
    records = {r["method"]: r for r in data["records"] if r["context"] == 96}
    assert set(records) == set(methods)
    for method in methods:
        assert math.isfinite(records[method]["ppl"]) and math.isfinite(records[method]["recall_ppl"])
        assert records[method]["ppl_tokens"] == records[method]["recall_ppl_tokens"] == 2 * 16
    for method in ("kvpress:StreamingLLM", "kvpress:KVzip"):
        record = records[method]
        assert record["compression_ratio"] == 0.75 and "bleu" in record["skipped"] and "bleu" not in record
        assert record["compress_s"] > 0 and record["compress_vs_prefill"] > 0
    streaming, kvzip = records["kvpress:StreamingLLM"], records["kvpress:KVzip"]
    assert streaming["cache_tokens"] == int(95 * 0.25) and streaming["cache_bytes"] == streaming["cache_bytes_unmasked"]
    # KVzip masks evicted entries per head in place: all 95 are stored, a quarter of them unmasked
    assert kvzip["cache_tokens"] == 95 and kvzip["cache_bytes_unmasked"] < kvzip["cache_bytes"]
    assert abs(kvzip["cache_tokens_unmasked"] - 95 * 0.25) <= 1
    assert (tmp_path / "out" / "quality.png").stat().st_size > 1000


def test_a_press_keeping_everything_answers_planted_facts_as_full_kv_does(loaded, tmp_path, monkeypatch):
    model, tokenizer, runner = loaded
    keep_all = runner.kvpress.StreamingLLMPress(compression_ratio=0.0)
    monkeypatch.setattr(bench_peers.PressRunner, "press", lambda self, method, ratio: keep_all)
    options = QualityOptions(
        methods=["full", "kvpress:StreamingLLM"], metrics=["qa"], ratios=[0.25], contexts=[96], qa_samples=1,
        depths=[0.2, 0.8], inputs=[str(text_file(tmp_path))],
    )  # fmt: skip
    data = json.loads(run_quality(model, tokenizer, options, tmp_path / "out", adapter="none").read_text())
    records = {r["method"]: r for r in data["records"]}
    full, press = records["full"], records["kvpress:StreamingLLM"]
    # the press prefills what the chat session reads (template start + document) and asks the same prompt
    assert [e["answer"] for e in press["qa_examples"]] == [e["answer"] for e in full["qa_examples"]]
    assert len(press["qa_examples"]) == 2 and "qa" not in press.get("skipped", {})
    assert press["seconds_per_answer"] > 0 and press["peak_question_bytes"] >= press["cache_bytes_unmasked"] > 0


def test_masked_entries_get_no_attention_as_with_kvpress_own_fake_keys(loaded):
    import copy

    _, _, runner = loaded
    model = runner.model
    ids = torch.randint(3, 90, (80,), generator=torch.Generator().manual_seed(3)).tolist()
    cache, _ = runner._prefill(ids, runner.press("kvpress:KVzip", 0.5))
    masked = runner._take_masks()
    assert masked and sum(len(i[0]) for i in masked.values()) == int(4 * 2 * 80 * 0.5)
    step = dict(input_ids=torch.tensor([[7]]), position_ids=torch.tensor([[80]]))
    with torch.no_grad():
        theirs_cache, plain_cache = copy.deepcopy(cache), copy.deepcopy(cache)
        for index, indices in masked.items():  # kvpress's way: one fake key per head for this one query
            model.model.layers[index].self_attn.masked_key_indices = indices
        theirs = model(**step, past_key_values=theirs_cache).logits
        runner._take_masks()
        with runner._masking(cache, masked):
            ours = model(**step, past_key_values=cache).logits
        plain = model(**step, past_key_values=plain_cache).logits  # nothing masked
    assert torch.allclose(ours, theirs, atol=1e-5) and not torch.allclose(ours, plain, atol=1e-3)
