"""Cache policies (each keeps what it promises) and the two benchmarks (smoke runs on a tiny model)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import text_file, tiny_llama, tiny_tokenizer
from transformers import DynamicCache

from nugget2d.compress import Nugget2DConfig, Nugget2DModel, nugget_count
from nugget2d.compress.hf_compat import returned_cache
from nugget2d.compress.policies import group_bounds
from nugget2d.compress.rope import rerotate
from nugget2d.runtime.bench_common import CacheShape, configurations, merge_results, run_options
from nugget2d.runtime.bench_quality import QualityOptions, run_quality
from nugget2d.runtime.bench_speed import IDEAL, SpeedOptions, compare, run_speed, unmodified
from nugget2d.runtime.cli import main
from nugget2d.runtime.generation import GenerationSettings, TokenStream
from nugget2d.runtime.session import StreamingSession, StreamSettings

COMPRESSING = ("nugget2d", "streaming", "snapkv", "compressive")


def _model() -> Nugget2DModel:
    return Nugget2DModel.from_base(tiny_llama(), Nugget2DConfig(scorer_layer=1)).eval()


def _session(model: Nugget2DModel, **settings) -> StreamingSession:
    return StreamingSession(model, tiny_tokenizer(), StreamSettings(**settings), chat=False)


def _ids(count: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 90, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- policies ----------------------------------------------------------------------------------------


def test_streaming_keeps_exactly_the_sinks_and_the_last_tokens():
    session = _session(_model(), budget=48, recent=8, segment=8, policy="streaming", positions="original")
    session.ingest_ids(_ids(200))
    positions = session.cache.layers[0].positions[0].tolist()
    assert positions == list(range(4)) + list(range(200 - 44, 200))
    assert session.nuggets == 0 and session.cache.nugget_counts().item() == 0


@pytest.mark.parametrize("method", ["full", "streaming", "snapkv", "compressive", "nugget2d"])
def test_only_nuggets_are_written_by_a_trained_encoder(method):
    """Full KV and the eviction baselines keep the unmodified model's K/V even when the adapter's encoder
    is trained; nugget2d's cache is the encoder's."""
    model = _model()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name and ".encoder." in name:
                parameter.normal_(std=0.05)
    ids = _ids(40)
    settings = CacheShape(method, 0.5, 40, 30).settings()
    session = _session(model, **{**vars(settings), "budget": 200, "recent": 100, "segment": 64})
    session.ingest_ids(ids)
    with torch.no_grad():
        plain = returned_cache(tiny_llama()(torch.tensor([ids]), use_cache=True))
    same = torch.allclose(session.cache.layers[1].values, plain.layers[1].values, atol=1e-5)
    assert same == (method != "nugget2d")


def test_snapkv_scores_are_the_attention_received_from_the_last_queries():
    model = _model()
    session = _session(model, budget=120, recent=60, segment=40, policy="snapkv")
    ids = _ids(40)
    session.ingest_ids(ids)
    reference = tiny_llama()
    reference.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = reference(torch.tensor([ids]), output_attentions=True).attentions
    expected = sum(layer[0, :, -32:, :].sum(dim=(0, 1)) for layer in attentions)
    assert torch.allclose(session.cache.layers[0].scores[0], expected, atol=1e-4)


def test_snapkv_keeps_the_tokens_that_received_most_attention():
    session = _session(_model(), ratio=0.25, budget=100, recent=4, segment=16, policy="snapkv", positions="original")
    session.ingest_ids(_ids(16), final=False)
    scores = session.cache.layers[0].scores[0].clone()
    session.ingest_ids(_ids(16, seed=1), final=False)  # entries 4..11 leave the raw window: 2 of them stay
    leaving = scores[4:12]
    expected = sorted(4 + int(i) for i in leaving.topk(nugget_count(8, 0.25)).indices)
    kept = session.cache.layers[0].positions[0, 4 : 4 + session.nuggets].tolist()
    assert kept == expected
    assert session.cache.nugget_counts().item() == 0  # plain K/V, no score bias


def test_compressive_entries_are_the_means_of_their_groups():
    model = _model()
    session = _session(model, ratio=0.25, budget=100, recent=4, segment=16, policy="compressive", positions="original")
    session.ingest_ids(_ids(16), final=False)
    before = [(layer.keys.clone(), layer.values.clone(), layer.positions.clone()) for layer in session.cache.layers]
    session.ingest_ids(_ids(16, seed=1), final=False)  # entries 4..11 leave: 2 groups of 4
    assert session.nuggets == 2 and session.cache.get_seq_length() == 4 + 2 + 4 + 16
    for layer, (keys, values, positions) in zip(session.cache.layers, before):
        for slot, (begin, end) in enumerate(group_bounds(8, 2)):
            members = list(range(4 + begin, 4 + end))
            last = members[-1]
            assert layer.positions[0, 4 + slot] == positions[0, last]
            assert torch.allclose(layer.values[0, :, 4 + slot], values[0, :, members].mean(dim=1), atol=1e-6)
            moved = rerotate(keys[:, :, members], positions[:, [last]] - positions[:, members], model.rotary_emb)
            assert torch.allclose(layer.keys[0, :, 4 + slot], moved[0].mean(dim=1), atol=1e-5)


def test_nugget2d_keeps_the_scorer_selection_as_nuggets():
    model = _model()
    session = _session(model, ratio=0.25, budget=100, recent=4, segment=16, positions="original")
    session.ingest_ids(_ids(16), final=False)
    scores = session.cache.layers[0].scores[0, 4:12].clone()
    session.ingest_ids(_ids(16, seed=1), final=False)
    chosen, _ = model.select(scores[None], ratio=0.25)
    assert session.cache.layers[0].positions[0, 4:6].tolist() == [4 + int(i) for i in chosen[0]]
    assert session.cache.nugget_counts().item() == 2


@pytest.mark.parametrize("policy", COMPRESSING)
def test_every_policy_fills_the_same_budget_and_answers(policy):
    session = _session(_model(), ratio=0.2, budget=64, recent=12, segment=12, policy=policy)
    session.ingest_ids(_ids(400))  # 400 = 33 segments + 4: the last, short one leaves some room free
    assert 64 - 12 <= session.cache.get_seq_length() <= 64
    answer = list(session.ask_ids([5, 6], GenerationSettings(max_new_tokens=10, ignore_eos=True)))
    assert len(answer) == 10 and session.cache.get_seq_length() == 64 - 12 + 2 + 9


def test_score_ids_equals_a_plain_forward_when_nothing_is_evicted():
    session = _session(_model(), ratio=0.5, budget=200, recent=150, segment=32)
    ids = _ids(60)
    session.ingest_ids(ids[:38])
    scored = session.score_ids(ids[38:])
    with torch.no_grad():
        logits = tiny_llama()(torch.tensor([ids])).logits[0, 38:-1].log_softmax(-1)
    assert torch.allclose(scored, logits.gather(1, torch.tensor(ids[39:])[:, None])[:, 0], atol=1e-4)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown cache policy"):
        StreamSettings(policy="h2o")


# --- benchmarks -------------------------------------------------------------------------------------


def test_speed_bench_writes_json_and_png_at_equal_budgets(tmp_path):
    options = SpeedOptions(
        methods=["full", *COMPRESSING], ratios=[0.25], contexts=[64, 128], repeats=2, decode_tokens=4
    )
    path = run_speed(_model(), tiny_tokenizer(), options, tmp_path / "out", adapter=None)
    data = json.loads(path.read_text())
    assert data["machine"]["untrained_adapter"] is True and "torch" in data["machine"]
    records = data["records"]
    assert {(r["method"], r["context"]) for r in records} == {(m, c) for m in ["full", *COMPRESSING] for c in (64, 128)}
    for record in records:
        for key in ("ratio", "cache_tokens", "cache_bytes", "prefill_s", "decode_ms_per_token", "peak_rss_bytes"):
            assert record[key] > 0, key
        assert record["repeats"] == 2 and record["decode_tokens_timed"] == 8
    for context in (64, 128):
        sizes = {r["cache_tokens"] for r in records if r["context"] == context and r["method"] != "full"}
        prompt = data["prompt_tokens"]
        assert sizes == {math.ceil(0.25 * context) + prompt + 4}
        full = next(r for r in records if r["context"] == context and r["method"] == "full")
        assert full["cache_tokens"] >= context + prompt + 4
    assert (tmp_path / "out" / "speed.png").stat().st_size > 1000


def test_ideal_holds_as_many_entries_as_nugget2d_and_every_record_compares_to_it(tmp_path):
    """``ideal`` ends decoding with as many K/V entries per layer and head as nugget2d's (ragged, per-head)
    cache, in a plain cache of exactly that size; every record relates its time and peak to full KV's
    and the compressing ones to ideal's."""
    model = Nugget2DModel.from_base(tiny_llama(), Nugget2DConfig(allocation="head", scorer_layer=1)).eval()
    options = SpeedOptions(
        methods=["full", IDEAL, "nugget2d", "streaming"], ratios=[0.25], contexts=[96], repeats=1, decode_tokens=3
    )
    data = json.loads(run_speed(model, tiny_tokenizer(), options, tmp_path, adapter=None).read_text())
    records = {r["method"]: r for r in data["records"]}
    ideal, nugget, full = records[IDEAL], records["nugget2d"], records["full"]
    entries = round(nugget["kv_entries_per_head"])
    assert ideal["kv_entries_per_head"] == ideal["cache_tokens"] == entries
    assert ideal["cache_bytes"] == model.full_kv_bytes(entries)
    assert ideal["prefill_tokens"] == nugget["prefill_tokens"] == 96  # both read the whole context, in segments
    for record in records.values():
        assert record["ingest_tokens_per_s"] == pytest.approx(96 / record["prefill_s"])
    assert data["ideal_attention"] == "sdpa" and model.base.config._attn_implementation == "nugget2d_sdpa"
    for record in records.values():
        assert record["decode_speedup_vs_full"] == pytest.approx(full["decode_ms_per_token"] / record[
            "decode_ms_per_token"])  # fmt: skip
        assert record["peak_rss_reduction_vs_full"] == pytest.approx(full["peak_rss_bytes"] / record["peak_rss_bytes"])
    for method in ("nugget2d", "streaming"):
        fraction = ideal["decode_ms_per_token"] / records[method]["decode_ms_per_token"]
        assert records[method]["fraction_of_ideal_speedup"] == pytest.approx(fraction)
        assert records[method]["fraction_of_ideal_rss_reduction"] > 0
        ingest = records[method]["ingest_tokens_per_s"] / ideal["ingest_tokens_per_s"]
        assert records[method]["fraction_of_ideal_ingest"] == pytest.approx(ingest)
    assert "fraction_of_ideal_speedup" not in full and "fraction_of_ideal_speedup" not in ideal


def test_ideal_is_the_unmodified_model_over_a_plain_cache():
    """Inside ``unmodified`` the model reads a DynamicCache with transformers' attention and no adapter,
    even a trained one: its logits are the plain LM's; the nugget2d backend is back after."""
    model = _model()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    ids = _ids(30)
    with unmodified(model) as plain, torch.no_grad():
        assert model.base.config._attn_implementation == "sdpa"
        cache = DynamicCache()
        plain(torch.tensor([ids[:20]]), nuggets=cache)
        logits = plain(torch.tensor([ids[20:]]), nuggets=cache).logits[0, -1]
        stream = TokenStream(plain, DynamicCache(), ids, GenerationSettings(max_new_tokens=3, ignore_eos=True))
        tokens = list(stream)
    assert model.base.config._attn_implementation == "nugget2d_sdpa"
    reference = tiny_llama()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0, -1]
        generated = reference.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)[0, 30:].tolist()
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert tokens == generated and stream.cache.get_seq_length() == 32


def test_ideal_needs_nugget2d_and_only_the_speed_bench_takes_it():
    with pytest.raises(ValueError, match="measure nugget2d with it"):
        SpeedOptions(methods=["full", IDEAL], ratios=[0.1], contexts=[1024])
    with pytest.raises(ValueError, match="unknown method"):
        QualityOptions(methods=["full", IDEAL], ratios=[0.1], contexts=[1024])
    with pytest.raises(ValueError, match="threads"):
        SpeedOptions(methods=["full"], ratios=[0.1], contexts=[1024], threads=[0])
    with pytest.raises(ValueError, match="reading"):
        SpeedOptions(methods=["full"], ratios=[0.1], contexts=[1024], reading="skim")


def test_gains_are_over_full_kv_at_the_same_context_and_threads():
    records = [
        {"method": m, "ratio": r, "context": 8, "threads": t, "decode_ms_per_token": ms, "peak_rss_bytes": 100}
        for m, r, t, ms in [("full", 1.0, 1, 300.0), (IDEAL, 0.1, 1, 100.0), ("nugget2d", 0.1, 1, 125.0),
                            ("full", 1.0, 2, 200.0), ("nugget2d", 0.1, 2, 50.0)]
    ]  # fmt: skip
    out = {(r["method"], r["threads"]): r for r in compare(records)}
    assert out[("nugget2d", 1)]["decode_speedup_vs_full"] == 2.4 and out[(IDEAL, 1)]["decode_speedup_vs_full"] == 3
    assert out[("nugget2d", 1)]["fraction_of_ideal_speedup"] == 0.8
    two = out[("nugget2d", 2)]
    assert two["decode_speedup_vs_full"] == 4 and "fraction_of_ideal_speedup" not in two


def test_quality_bench_writes_every_metric_at_equal_budgets(tmp_path):
    options = QualityOptions(
        methods=["full", *COMPRESSING],
        ratios=[0.25],
        contexts=[96],
        samples=2,
        continuation=16,
        passage=32,
        repeat=16,
        ae_tokens=40,
        ae_samples=2,
        depths=[0.2, 0.8],
        qa_samples=1,
        inputs=[str(text_file(tmp_path))],
    )
    path = run_quality(_model(), tiny_tokenizer(), options, tmp_path / "out", adapter="none")
    data = json.loads(path.read_text())
    assert data["machine"]["untrained_adapter"] is True
    at_context = [r for r in data["records"] if r["context"] == 96]
    assert {r["method"] for r in at_context} == {"full", *COMPRESSING}
    for record in at_context:
        assert record["ppl"] > 1 and record["recall_ppl"] > 1
        assert 0 <= record["qa_accuracy"] <= 1 and set(record["qa_by_depth"]) == {"0.2", "0.8"}
        assert record["ppl_tokens"] == 2 * 16 and record["recall_ppl_tokens"] == 2 * 16
    assert {r["cache_tokens"] for r in at_context if r["method"] != "full"} == {math.ceil(0.25 * 96)}
    autoencoding = [r for r in data["records"] if r["context"] == 40]
    assert len(autoencoding) == 5 and all(0 <= r["bleu"] <= 1 for r in autoencoding)
    assert (tmp_path / "out" / "quality.png").stat().st_size > 1000


def test_recall_ppl_is_the_perplexity_of_the_repeated_passage(tmp_path):
    from nugget2d.runtime.bench_quality import RECALL_LEAD, perplexities

    model, tokenizer = _model(), tiny_tokenizer()
    options = QualityOptions(
        methods=["full"], ratios=[0.5], contexts=[64], metrics=["recall_ppl"], passage=32, repeat=8, continuation=8
    )
    window = _ids(72)
    shape = CacheShape("full", 1.0, 64, reserve=9)
    nll, count = perplexities(model, tokenizer, shape, window, options)["recall_ppl"]
    sequence = window[:64] + window[RECALL_LEAD : RECALL_LEAD + 8]
    with torch.no_grad():
        logits = tiny_llama()(torch.tensor([sequence])).logits[0, 63:-1].log_softmax(-1)
    expected = -logits.gather(1, torch.tensor(sequence[64:])[:, None]).sum()
    assert count == 8 and math.isclose(nll, float(expected), rel_tol=1e-4)


def test_configurations_measure_full_once_per_context():
    configs = configurations(["full", "nugget2d"], [0.1, 0.2], [100, 200])
    assert configs.count(("full", 1.0, 100)) == 1 and ("nugget2d", 0.2, 200) in configs and len(configs) == 6


def test_merging_a_merged_file_keeps_one_flat_list_of_runs(tmp_path):
    first, second = tmp_path / "a" / "quality.json", tmp_path / "b" / "quality.json"
    for path, ppl in ((first, 30.0), (second, 29.0)):
        path.parent.mkdir()
        record = {"method": "nugget2d", "ratio": 0.1, "context": 2048, "ppl": ppl}
        path.write_text(json.dumps({"machine": {"date": "d"}, "options": {"samples": 5}, "records": [record]}))
    merge_results([first, second], tmp_path / "m")
    merge_results([tmp_path / "m", second], tmp_path / "m")  # re-measured once more: merged into the merge
    merged = json.loads((tmp_path / "m" / "quality.json").read_text())
    assert [run["source"] for run in merged["runs"]] == [str(first), str(second), str(second)]
    assert run_options(merged) == {"samples": 5} and [r["ppl"] for r in merged["records"]] == [29.0]


def test_bench_cli_runs_and_refuses_bad_input(tiny_model_dir, tmp_path, capsys):
    text = text_file(tmp_path)
    common = ["--model", str(tiny_model_dir), "--input", str(text), "--out", str(tmp_path / "cli")]
    assert main(["bench", "speed", *common, "--contexts", "64", "--ratios", "0.25", "--repeats", "1",
                 "--decode-tokens", "2", "--methods", "full,streaming"]) == 0  # fmt: skip
    run = json.loads((tmp_path / "cli" / "speed.json").read_text())
    assert [r["method"] for r in run["records"]] == ["full", "streaming"]
    assert "untrained" in capsys.readouterr().err
    again = tmp_path / "again" / "speed.json"  # streaming measured again: its record replaces the first one
    again.parent.mkdir()
    again.write_text(json.dumps({**run, "records": [{**run["records"][1], "decode_ms_per_token": 1.5}]}))
    assert main(["bench", "merge", str(tmp_path / "cli"), str(again), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "speed.json").read_text())
    assert [(r["method"], r["decode_ms_per_token"]) for r in merged["records"]] == [
        ("full", run["records"][0]["decode_ms_per_token"]),
        ("streaming", 1.5),
    ]
    assert len(merged["runs"]) == 2 and (tmp_path / "m" / "speed.png").is_file()
    for bad, message in [
        (["--methods", "full,h2o"], "unknown method"),
        (["--ratios", "1.5"], "ratio"),
        (["--ratios", "0.01", "--contexts", "64"], "too few"),
    ]:
        assert main(["bench", "speed", *common, *bad]) == 2
        assert message in capsys.readouterr().err
    missing = ["--model", str(tiny_model_dir), "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path)]
    assert main(["bench", "quality", *missing]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_budget_split_moves_entries_between_the_raw_window_and_kept_entries():
    quarter, half = (CacheShape("nugget2d", 0.1, 2048, 100, share).settings() for share in (0.25, 0.5))
    assert (quarter.recent, half.recent) == (51, 102)
    assert quarter.budget == half.budget and quarter.sinks == half.sinks == 4
    with pytest.raises(ValueError, match="recent-share"):
        CacheShape("nugget2d", 0.1, 2048, 100, 0.9).settings()
    with pytest.raises(ValueError, match="recent_share"):
        QualityOptions(methods=["nugget2d"], ratios=[0.1], contexts=[2048], recent_share=1.0)


def test_text_positions_reach_the_sessions_and_stop_at_the_model_window(tmp_path):
    """``--positions original`` numbers every compressing method's cache by text position (the
    sessions get it, and results differ from cache positions); a context plus what is scored past the
    model's window is refused before any window is measured."""
    assert CacheShape("snapkv", 0.25, 96, 17, 0.25, "original").settings().positions == "original"
    common = dict(methods=["snapkv"], ratios=[0.25], metrics=["ppl"], samples=1, continuation=16)
    inputs = [str(text_file(tmp_path))]
    ppl = {}
    for positions in ("cache", "original"):
        options = QualityOptions(contexts=[96], positions=positions, inputs=inputs, **common)
        path = run_quality(_model(), tiny_tokenizer(), options, tmp_path / positions, adapter="none")
        ppl[positions] = json.loads(path.read_text())["records"][0]["ppl"]
    assert ppl["cache"] != pytest.approx(ppl["original"], rel=1e-6)
    options = QualityOptions(contexts=[250], positions="original", inputs=inputs, **common)
    with pytest.raises(ValueError, match="past the model's native window \\(256\\)"):
        run_quality(_model(), tiny_tokenizer(), options, tmp_path / "long", adapter="none")
    assert not (tmp_path / "long").exists()
    with pytest.raises(ValueError, match="positions must be"):
        QualityOptions(contexts=[96], positions="text", **common)


def test_whole_reading_and_the_observation_window_reach_the_sessions(tmp_path):
    """``--reading whole`` lets every compressing method read its context with full attention before it
    compresses (results differ from streaming); ``--observation-window`` reaches the sessions too."""
    whole = CacheShape("snapkv", 0.25, 96, 17, reading="whole", observation_window=0).settings()
    assert whole.read_budget == 96 + 17 + 64 and whole.observation_window == 0
    assert CacheShape("snapkv", 0.25, 96, 17).settings().read_budget is None
    # 17 entries kept for the prompt: 16-token segments, so streaming compresses while it reads
    common = dict(
        methods=["snapkv"], ratios=[0.25], metrics=["ppl"], samples=1, continuation=16, repeat=16, contexts=[96]
    )
    inputs = [str(text_file(tmp_path))]
    records = {}
    for reading in ("stream", "whole"):
        options = QualityOptions(reading=reading, inputs=inputs, **common)
        path = run_quality(_model(), tiny_tokenizer(), options, tmp_path / reading, adapter="none")
        records[reading] = json.loads(path.read_text())["records"][0]
    assert records["stream"]["segment"] == 16
    assert records["stream"]["cache_tokens"] == records["whole"]["cache_tokens"]  # the same budget when scored
    assert records["stream"]["ppl"] != pytest.approx(records["whole"]["ppl"], rel=1e-6)
    with pytest.raises(ValueError, match="reading must be"):
        QualityOptions(reading="all", **common)
    with pytest.raises(ValueError, match="observation_window"):
        QualityOptions(observation_window=-1, **common)
