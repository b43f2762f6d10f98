"""Training: the loss falls when overfitting, on one process or two, with each objective's flags
(resuming: ``test_training_resume.py``)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from tiny_models import SENTENCES, tiny_llama, tiny_tokenizer

from nugget2d.compress import Nugget2DModel
from nugget2d.runtime.train import TrainConfig, _free_port, train_loop
from nugget2d.runtime.train_data import Shape, build_examples, sentence_segments


def _config(tiny_model_dir, corpus, output, **overrides) -> TrainConfig:
    settings = dict(
        data=[str(corpus)],
        output=str(output),
        model=str(tiny_model_dir),
        segment_size=16,
        batch_size=4,
        lr=1e-2,
        warmup_steps=2,
        ratio=0.5,
        scorer_layer=1,
        lora_rank=8,
        decoder_adapter=True,
        eval_every=1000,
        save_every=1000,
        max_steps=30,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def test_overfitting_halves_the_autoencoding_loss(tmp_path, trainable_model_dir, corpus):
    metrics = train_loop(_config(trainable_model_dir, corpus, tmp_path / "run", max_steps=80))
    first = sum(m["loss"] for m in metrics[:3]) / 3
    last = sum(m["loss"] for m in metrics[-3:]) / 3
    assert last <= first / 2, (first, last)
    adapter = tmp_path / "run" / "checkpoint-80" / "adapter"
    restored = Nugget2DModel.from_pretrained(adapter, base_model=tiny_llama(initializer_range=0.3))
    assert restored.config.ratio == 0.5
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    last_record = json.loads(lines[-1])
    assert len(lines) == 80 and "heldout_loss" in last_record
    assert 0 <= last_record["autoencode_bleu"] <= 1
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resuming_with_another_base_model_is_refused(tmp_path, tiny_model_dir, trainable_model_dir, corpus):
    train_loop(_config(tiny_model_dir, corpus, tmp_path / "run", max_steps=1))
    with pytest.raises(ValueError, match="trained on base model"):
        train_loop(_config(trainable_model_dir, corpus, tmp_path / "run", max_steps=2, resume=True))


def test_resume_without_a_checkpoint_and_missing_data_are_refused(tmp_path, tiny_model_dir, corpus):
    with pytest.raises(ValueError, match="no checkpoint"):
        train_loop(_config(tiny_model_dir, corpus, tmp_path / "c", resume=True, max_steps=2))
    with pytest.raises(ValueError, match="does not exist"):
        train_loop(_config(tiny_model_dir, tmp_path / "absent", tmp_path / "d"))


def test_segments_end_at_sentence_ends():
    tokenizer = tiny_tokenizer()
    ids = tokenizer(SENTENCES * 4, add_special_tokens=False).input_ids
    segments = sentence_segments(ids, tokenizer, 16, slack=0.5)
    assert all(len(s) <= 16 for s in segments)
    assert all(tokenizer.convert_ids_to_tokens(s)[-1] == "." for s in segments)
    assert [t for s in segments for t in s] == ids[: sum(map(len, segments))]  # in order, nothing skipped
    assert len(ids) - sum(map(len, segments)) < 8  # at most a short tail is dropped


def test_continue_examples_pair_a_segment_with_what_follows(tmp_path, corpus):
    examples = build_examples([corpus], tiny_tokenizer(), "continue", Shape(16, 5))
    assert examples and all(len(e.target) <= 5 for e in examples)


def _launch_two_processes(tmp_path, model_dir, corpus, ds_config: str, compare: bool = False):
    """`deepspeed --num_gpus 2 --module nugget2d.runtime.train` on the CPU (gloo), as users launch it:
    stopped after step 1, then resumed."""
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable))
    output = tmp_path / "run"
    command = [
        launcher,
        "--num_gpus",
        "2",
        "--master_port",
        str(_free_port()),
        "--module",
        "nugget2d.runtime.train",
        "--data",
        str(corpus),
        "--model",
        str(model_dir),
        "--max-steps",
        "2",
        "--save-every",
        "2",
        "--segment-size",
        "16",
        "--batch-size",
        "2",
        "--scorer-layer",
        "1",
        "--ds-config",
        ds_config,
        "--output",
        str(output),
    ]
    runs = [["--stop-at", "1"], ["--resume"]]  # each rank saves and restores its own partition
    if compare:  # and an uninterrupted run beside it
        runs.append(["--output", str(tmp_path / "whole")])
    for extra in runs:
        result = subprocess.run(
            command + extra,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
            env={**os.environ, "DS_ACCELERATOR": "cpu"},
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((output / "checkpoint-2" / "trainer_state.json").read_text())["trajectory"]["world_size"] == 2
    restored = Nugget2DModel.from_pretrained(output / "checkpoint-2" / "adapter", base_model=tiny_llama())
    assert restored.config.scorer_layer == 1
    assert len((output / "metrics.jsonl").read_text().splitlines()) == 2
    if compare:
        from test_training_resume import assert_same_final_state

        assert_same_final_state(tmp_path / "whole" / "checkpoint-2", output / "checkpoint-2")


def test_zero2_two_processes_with_the_deepspeed_launcher(tmp_path, tiny_model_dir, corpus):
    _launch_two_processes(tmp_path, tiny_model_dir, corpus, "zero2.json")


@pytest.mark.slow
def test_zero3_two_processes_with_the_deepspeed_launcher(tmp_path, tiny_model_dir, corpus):
    _launch_two_processes(tmp_path, tiny_model_dir, corpus, "zero3.json", compare=True)


def test_bad_deepspeed_configs_are_named(tmp_path, tiny_model_dir, corpus):
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        train_loop(_config(tiny_model_dir, corpus, tmp_path / "e", ds_config=str(broken)))
    with pytest.raises(ValueError, match="not found"):
        train_loop(_config(tiny_model_dir, corpus, tmp_path / "e", ds_config="zero9.json"))


def test_offload_without_the_cpu_adam_op_is_refused(tmp_path, tiny_model_dir, corpus, monkeypatch):
    from deepspeed.ops.op_builder import CPUAdamBuilder

    monkeypatch.setattr(CPUAdamBuilder, "is_compatible", lambda self, verbose=False: False)
    with pytest.raises(ValueError, match="needs DeepSpeed's CPU Adam op.*use zero2.json or zero3.json"):
        train_loop(_config(tiny_model_dir, corpus, tmp_path / "f", ds_config="zero3_offload.json"))


def test_a_hybrid_mix_trains_and_reports_each_objective(tmp_path, tiny_model_dir, corpus):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"context": SENTENCES, "question": "what had she", "answer": "a blue book"}) + "\n")
    config = _config(
        tiny_model_dir,
        corpus,
        tmp_path / "mix",
        data=[str(corpus), str(qa)],
        objective="mix",
        mix="continue=1,recall=1,autoencode=1,qa=0.2",
        recent=4,
        sinks=2,
        target_size=5,
        max_steps=2,
        eval_fraction=0.3,
    )
    (record,) = train_loop(config)[-1:]
    assert {"heldout_loss/continue", "heldout_loss/recall", "autoencode_bleu"} <= set(record)
    assert math.isfinite(record["heldout_loss"]) and record["heldout_ppl"] == pytest.approx(
        math.exp(record["heldout_loss"])
    )


def test_ray_train_two_workers_report_a_loadable_checkpoint(tmp_path, tiny_model_dir, corpus):
    ray = pytest.importorskip("ray")
    from nugget2d.runtime.train import train_with_ray

    try:
        result = train_with_ray(_config(tiny_model_dir, corpus, tmp_path / "ray", max_steps=2, save_every=2), workers=2)
    finally:
        ray.shutdown()
    assert result.error is None and result.metrics["step"] == 2
    with result.checkpoint.as_directory() as adapter:
        restored = Nugget2DModel.from_pretrained(adapter, base_model=tiny_llama())
    assert restored.config.ratio == 0.5


def test_init_adapter_starts_from_a_trained_adapter(tmp_path, tiny_model_dir, corpus):
    train_loop(_config(tiny_model_dir, corpus, tmp_path / "first", max_steps=3, save_every=3))
    adapter = tmp_path / "first" / "checkpoint-3" / "adapter"
    fresh = train_loop(_config(tiny_model_dir, corpus, tmp_path / "fresh", max_steps=1))
    warm = train_loop(_config(tiny_model_dir, corpus, tmp_path / "warm", max_steps=1, init_adapter=str(adapter)))
    assert abs(warm[0]["loss"] - fresh[0]["loss"]) > 1e-4  # same batch, other weights
    with pytest.raises(ValueError, match="is not a Nugget2D adapter directory"):
        train_loop(_config(tiny_model_dir, corpus, tmp_path / "x", max_steps=1, init_adapter=str(tmp_path / "no")))


def test_decoder_adapter_added_to_an_adapter_that_had_none(tmp_path, tiny_model_dir, corpus):
    train_loop(_config(tiny_model_dir, corpus, tmp_path / "enc", max_steps=2, save_every=2, decoder_adapter=False))
    encoder_only = tmp_path / "enc" / "checkpoint-2" / "adapter"
    assert not Nugget2DModel.from_pretrained(encoder_only, base_model=tiny_llama()).config.decoder_adapter
    train_loop(
        _config(tiny_model_dir, corpus, tmp_path / "dec", max_steps=2, save_every=2, init_adapter=str(encoder_only))
    )
    reader = Nugget2DModel.from_pretrained(tmp_path / "dec" / "checkpoint-2" / "adapter", base_model=tiny_llama())
    assert reader.config.decoder_adapter
    decoder_b = [p for n, p in reader.peft_model.named_parameters() if ".decoder." in n and "lora_B" in n]
    assert decoder_b and any(p.abs().sum() > 0 for p in decoder_b)  # it trained: B starts at zero
