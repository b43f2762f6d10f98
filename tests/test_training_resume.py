"""Resuming training: bit for bit after a clean stop or a SIGKILL, from safetensors + JSON only
(a pickle planted in a checkpoint is refused, never run), and only with the settings and data the
checkpoint was trained with unless ``allow_config_change`` says otherwise."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import _config

from nugget2d.runtime import checkpoints
from nugget2d.runtime.train import DS_CONFIGS, TrainConfig, train_loop

WEIGHTS = ("optimizer.safetensors", "adapter/adapter_model.safetensors", "adapter/scorer.safetensors")


def assert_same_final_state(ours: Path, theirs: Path) -> None:
    """The two checkpoints hold the same adapter weights and optimizer state, bit for bit."""
    optimizer = load_file(ours / "optimizer.safetensors")
    assert any(k.endswith("::exp_avg_sq") for k in optimizer) and "@group0::step" in optimizer
    for name in WEIGHTS:
        mine, other = load_file(ours / name), load_file(theirs / name)
        assert mine.keys() == other.keys(), name
        differing = [k for k in mine if not torch.equal(mine[k], other[k])]
        assert not differing, (name, differing[:5])


def test_resumed_training_equals_uninterrupted(tmp_path, tiny_model_dir, corpus):
    config = _config(tiny_model_dir, corpus, tmp_path / "a", max_steps=6, save_every=3, lr=1e-3)
    whole = train_loop(config)
    state = json.loads((tmp_path / "a" / "checkpoint-6" / "trainer_state.json").read_text())
    assert TrainConfig.from_saved({**state["config"], "steps": 6}) == config  # what overlap.py replays
    train_loop(_config(tiny_model_dir, corpus, tmp_path / "b", max_steps=6, stop_at=3, save_every=3, lr=1e-3))
    saved = sorted(p.name for p in (tmp_path / "b" / "checkpoint-3").iterdir())
    assert saved == ["adapter", "optimizer.safetensors", "rng-rank0.safetensors", "trainer_state.json"]
    resumed = train_loop(
        _config(tiny_model_dir, corpus, tmp_path / "b", max_steps=6, save_every=3, lr=1e-3, resume=True)
    )
    assert [m["step"] for m in resumed] == [4, 5, 6]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in whole[3:]]  # bit for bit
    assert_same_final_state(tmp_path / "a" / "checkpoint-6", tmp_path / "b" / "checkpoint-6")
    assert resumed[-1]["tokens_seen"] == whole[-1]["tokens_seen"]
    card = (tmp_path / "b" / "checkpoint-6" / "adapter" / "README.md").read_text()
    assert f"{whole[-1]['tokens_seen']:,} tokens seen" in card and "Steps: 6 of 6" in card
    logged = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]


def _cli_flags(model_dir: Path, corpus: Path, output: Path) -> list[str]:
    """`nugget2d train` flags equal to ``_config(..., max_steps=8, save_every=2, lr=1e-3)``."""
    return [
        *("--data", str(corpus), "--model", str(model_dir), "--output", str(output)),
        *("--segment-size", "16", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "2", "--ratio", "0.5"),
        *("--scorer-layer", "1", "--lora-rank", "8", "--decoder-adapter", "--eval-every", "1000"),
        *("--max-steps", "8", "--save-every", "2"),
    ]


@pytest.mark.slow
def test_a_run_killed_mid_step_resumes_bit_for_bit(tmp_path, tiny_model_dir, corpus):
    whole = train_loop(_config(tiny_model_dir, corpus, tmp_path / "whole", max_steps=8, save_every=2, lr=1e-3))
    cli = [shutil.which("nugget2d", path=os.path.dirname(sys.executable)), "train"]
    run = tmp_path / "killed"
    flags = _cli_flags(tiny_model_dir, corpus, run)
    # as a user starts it: not inside the process group this test's own run left in os.environ
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    process = subprocess.Popen([*cli, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 600
        while not (run / "latest").is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, process.communicate()[1][-3000:].decode()
        process.send_signal(signal.SIGKILL)  # the step after the first checkpoint is under way
        process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = (run / "latest").read_text().strip()
    assert killed_at.startswith("checkpoint-") and int(killed_at.split("-")[1]) < 8
    resumed = subprocess.run([*cli, *flags, "--resume"], capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_final_state(tmp_path / "whole" / "checkpoint-8", run / "checkpoint-8")
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 9))
    assert [r["loss"] for r in logged] == [m["loss"] for m in whole]


class Planted:
    """Unpickling this creates ``path``: what a malicious checkpoint could do instead."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_pickle_planted_in_a_checkpoint_is_refused_not_run(tmp_path, tiny_model_dir, corpus):
    run = tmp_path / "run"
    train_loop(_config(tiny_model_dir, corpus, run, max_steps=2, save_every=1, stop_at=1))
    # made to look like a checkpoint of the previous format: DeepSpeed engine state, pickled
    directory = run / "checkpoint-1"
    (directory / "optimizer.safetensors").unlink(missing_ok=True)
    state = json.loads((directory / "trainer_state.json").read_text())
    (directory / "trainer_state.json").write_text(json.dumps({k: state[k] for k in ("step", "tokens_seen", "config")}))
    marker = tmp_path / "pwned"
    (directory / "engine" / "state").mkdir(parents=True, exist_ok=True)
    (directory / "engine" / "latest").write_text("state")
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"module": Planted(marker)}, directory / "engine" / "state" / name)
    torch.save(Planted(marker), directory / "rng.pt")
    with pytest.raises(
        ValueError, match=r"(?s)older nugget2d.*pickled state \(engine/state/.*never loaded.*--init-adapter"
    ):
        train_loop(_config(tiny_model_dir, corpus, run, max_steps=2, resume=True))
    assert not marker.exists()
    (run / "latest").write_text("../../elsewhere\n")
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        train_loop(_config(tiny_model_dir, corpus, run, max_steps=2, resume=True))


def test_resuming_with_other_settings_or_data_is_refused_unless_allowed(tmp_path, tiny_model_dir, corpus):
    run = tmp_path / "run"
    train_loop(_config(tiny_model_dir, corpus, run, max_steps=3, save_every=1, stop_at=1))
    with pytest.raises(ValueError, match=r"batch_size: 4 -> 2; .*seed: 0 -> 7.*--allow-config-change"):
        train_loop(_config(tiny_model_dir, corpus, run, max_steps=3, resume=True, batch_size=2, seed=7))
    with pytest.raises(ValueError, match=r"max_steps: 3 -> 4; ratio: 0.5 -> 0.25"):
        train_loop(_config(tiny_model_dir, corpus, run, max_steps=4, resume=True, ratio=0.25))
    text = corpus / "few.txt"
    text.write_text(text.read_text().replace("book", "bowl"))
    with pytest.raises(ValueError, match=r"other settings or data.*data: \['[0-9a-f]{12}'\] -> \['[0-9a-f]{12}'\]"):
        train_loop(_config(tiny_model_dir, corpus, run, max_steps=3, resume=True))
    with (run / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 2, "loss": 4.5')  # a line cut short, as a killed writer could leave it
    resumed = train_loop(
        _config(tiny_model_dir, corpus, run, max_steps=3, resume=True, allow_config_change=True, lr=2e-2)
    )
    assert [m["step"] for m in resumed] == [2, 3]
    assert resumed[0]["lr"] == 2e-2  # the new rate, at the saved step of the schedule (warm-up over: factor 1)
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]
    state = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["data"][0]["sha256"] == checkpoints.data_digests([text])[0]["sha256"]


def test_files_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    latest = tmp_path / "latest"
    checkpoints.atomic_write(latest, "checkpoint-2\n")

    def crash(descriptor):
        raise OSError("disk gone")

    with monkeypatch.context() as patch, pytest.raises(OSError, match="disk gone"):
        patch.setattr(os, "fsync", crash)
        checkpoints.atomic_write(latest, "checkpoint-4\n")
    assert latest.read_text() == "checkpoint-2\n" and [p.name for p in tmp_path.iterdir()] == ["latest"]
    metrics = tmp_path / "metrics.jsonl"
    for step in (1, 2, 3):
        checkpoints.append_line(metrics, {"step": step, "loss": 1.0 / step})
    metrics.write_text(metrics.read_text() + '{"step": 4, "lo')
    checkpoints.truncate_metrics(metrics, 2)
    assert metrics.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'


def test_a_deepspeed_config_without_zero_is_refused_before_training(tmp_path, tiny_model_dir, corpus):
    settings = json.loads((DS_CONFIGS / "zero2.json").read_text())
    settings["zero_optimization"] = {"stage": 0}
    config = tmp_path / "zero0.json"
    config.write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="need a ZeRO optimizer: set zero_optimization.stage to 1, 2 or 3"):
        train_loop(_config(tiny_model_dir, corpus, tmp_path / "run", ds_config=str(config), max_steps=1))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
