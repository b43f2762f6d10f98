"""`nugget2d generate --checkpoint DIR`: a long read interrupted and resumed with `--resume` answers as the
uninterrupted read does, from the same cache; and what would lose or misuse a checkpoint is refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from nugget2d.runtime.cli import main
from nugget2d.runtime.read_checkpoint import ReadCheckpoint

SHAPE = ["--budget", "96", "--recent", "32", "--segment", "16", "--quiet", "--max-new-tokens", "8"]


def _generate(model_dir, text, *extra) -> int:
    prompt = ["--prompt", "what fish ?"]
    return main(["generate", "--model", str(model_dir), "--input", str(text), *prompt, *SHAPE, *extra])


def _cache(directory) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    saved = ReadCheckpoint(directory).latest()
    return load_file(str(saved / "cache.safetensors"))


@pytest.fixture
def book(tmp_path):
    words = ["the", "old", "angler", "said", "river", "trout", "was", "good", "for", "fish", ".", "and", "a", "pike"]
    rng = torch.Generator().manual_seed(0)
    text = " ".join(words[i] for i in torch.randint(0, len(words), (1500,), generator=rng).tolist())
    path = tmp_path / "book.txt"
    path.write_text(text)
    return path


def test_an_interrupted_read_resumes_to_the_same_cache_and_answer(tmp_path, tiny_model_dir, book, capsys, monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _generate(tiny_model_dir, book, "--checkpoint", str(whole), "--stats-json", str(tmp_path / "a.json")) == 0
    answer = capsys.readouterr().out

    real_save, saves = ReadCheckpoint.save, []

    def save_then_stop(self, session):
        saves.append(real_save(self, session))
        if len(saves) == 3:
            raise KeyboardInterrupt  # as Ctrl-C or a killed session would, right after a save
        return saves[-1]

    monkeypatch.setattr(ReadCheckpoint, "save", save_then_stop)
    assert _generate(tiny_model_dir, book, "--checkpoint", str(parts), "--checkpoint-minutes", "1e-9") == 130
    monkeypatch.undo()
    assert [p.name for p in parts.iterdir() if p.is_dir()] == [saves[-1].name]  # older saves removed
    read_then = json.loads((saves[-1] / "session.json").read_text())["stats"]["tokens_ingested"]
    assert 0 < read_then < json.loads((tmp_path / "a.json").read_text())["tokens_ingested"]
    capsys.readouterr()

    stats = ["--stats-json", str(tmp_path / "b")]
    assert _generate(tiny_model_dir, book, "--checkpoint", str(parts), "--resume", *stats) == 0
    resumed = capsys.readouterr()
    assert resumed.out == answer
    assert "tokens already read" in resumed.err
    first, second = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b").read_text())
    assert second["tokens_ingested"] == first["tokens_ingested"]
    assert second["cache_tokens"] == first["cache_tokens"]
    expected, got = _cache(whole), _cache(parts)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_a_checkpoint_is_never_overwritten_or_misread(tmp_path, tiny_model_dir, book, capsys, asked_lookbacks):
    saved = tmp_path / "ckpt"
    assert _generate(tiny_model_dir, book, "--checkpoint", str(saved)) == 0
    capsys.readouterr()
    assert _generate(tiny_model_dir, book, "--checkpoint", str(saved)) == 2
    assert "add --resume" in capsys.readouterr().err
    other = tmp_path / "other.txt"
    other.write_text("a pike said the river was cold . " * 400)
    assert _generate(tiny_model_dir, other, "--checkpoint", str(saved), "--resume") == 2
    assert "the checkpoint read another text: the input's token 0 differs" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text(" ".join(book.read_text().split()[:50]))
    assert _generate(tiny_model_dir, short, "--checkpoint", str(saved), "--resume") == 2
    assert "fewer than the" in capsys.readouterr().err
    assert _generate(tiny_model_dir, book, "--checkpoint", str(saved), "--resume", "--budget", "128") == 2
    assert "other settings: budget 96 (asked 128)" in capsys.readouterr().err
    assert _generate(tiny_model_dir, book, "--checkpoint", str(saved), "--resume", "--lookback", "16") == 0
    # answers as asked now: the look-back is no reading setting
    assert [look.tokens for look in asked_lookbacks] == [16]
    assert _generate(tiny_model_dir, book, "--checkpoint", str(tmp_path / "none"), "--resume") == 2
    assert "no checkpoint in" in capsys.readouterr().err
    assert _generate(tiny_model_dir, book, "--resume") == 2
    assert "give its --checkpoint directory" in capsys.readouterr().err
    assert _generate(tiny_model_dir, book, "--checkpoint", str(tmp_path / "x"), "--checkpoint-minutes", "0") == 2
    assert "must be > 0 seconds" in capsys.readouterr().err


def test_skipping_what_was_read_works_across_chunk_boundaries():
    from tiny_models import tiny_llama, tiny_tokenizer

    from nugget2d.compress import Nugget2DConfig, Nugget2DModel
    from nugget2d.runtime.session import StreamingSession, StreamSettings

    model = Nugget2DModel.from_base(tiny_llama(), Nugget2DConfig(scorer_layer=1)).eval()
    session = StreamingSession(model, tiny_tokenizer(), StreamSettings(ratio=0.25, budget=96, recent=32, segment=16))
    ids = torch.randint(3, 90, (500,), generator=torch.Generator().manual_seed(1)).tolist()
    session.ingest_ids(ids[:305], final=False)  # 305 taken in: whole segments encoded, the rest waiting
    assert session.read_so_far() == 305 and session._waiting
    chunks = [ids[begin : begin + 70] for begin in range(0, 500, 70)]
    assert [t for chunk in session._skip_read(chunks) for t in chunk] == ids[305:]
    formatted = StreamingSession(model, tiny_tokenizer(), StreamSettings(ratio=0.25, budget=96, recent=32, segment=16))
    formatted.format = dataclasses.replace(formatted.format, document_prefix="the old angler")  # a start to add
    assert formatted._start_ids()
    formatted.ingest_formatted(ids[:40], final=False)  # the caller's own start: nothing added before it
    assert formatted.read_so_far() == 40
    assert [t for chunk in formatted._skip_read(chunks) for t in chunk] == ids[40:]
