"""The `nugget2d` command line: the installed console script, and its errors as users see them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from nugget2d.compress import NuggetCache
from nugget2d.runtime.cli import build_parser, main

EXE = shutil.which("nugget2d", path=os.path.dirname(sys.executable))


def test_console_script_compresses_a_file(tmp_path, tiny_model_dir):
    assert EXE, "the nugget2d console script is not installed"
    text = tmp_path / "text.txt"
    text.write_text("the old angler said that the river was good for fish . " * 6)
    out = tmp_path / "doc.safetensors"
    result = subprocess.run(
        [
            EXE,
            "compress",
            "--model",
            str(tiny_model_dir),
            "--input",
            str(text),
            "--output",
            str(out),
            "--ratio",
            "0.25",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["tokens"] == 72 and stats["cache_tokens"] == 18
    assert stats["cache_bytes"] < stats["full_kv_bytes"]
    assert NuggetCache.load(out).nugget_counts().tolist() == [18]


def test_every_subcommand_has_help(capsys):
    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"demo", "compress", "generate", "train"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exited:
            main([name, "--help"])
        assert exited.value.code == 0
        help_text = capsys.readouterr().out
        if name != "score":  # scoring compares JSONL files and loads no model
            assert "--model" in help_text, name


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "does not exist"), (b"", "is empty"), (b"\x00\x01binary", "looks binary"), (b"\xff\xfe\xfa", "not UTF-8")],
)
def test_bad_input_files_get_one_line_errors(tmp_path, tiny_model_dir, capsys, content, message):
    path = tmp_path / "input.txt"
    if content is not None:
        path.write_bytes(content)
    code = main(["compress", "--model", str(tiny_model_dir), "--input", str(path), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_bad_ratio_and_missing_model_get_one_line_errors(tmp_path, tiny_model_dir, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the river")
    assert (
        main(["compress", "--model", str(tiny_model_dir), "--input", str(text), "--output", "o", "--ratio", "2"]) == 2
    )
    assert "ratio must be in (0, 1]" in capsys.readouterr().err
    assert main(["compress", "--model", str(tmp_path / "nowhere"), "--input", str(text), "--output", "o"]) == 2
    assert "never downloads" in capsys.readouterr().err


def _generate(model_dir, text, prompt, *extra) -> int:
    """Run `nugget2d generate` in-process on the tiny model with a 96-entry cache."""
    shape = ["--budget", "96", "--recent", "32", "--segment", "16", "--quiet"]
    return main(["generate", "--model", str(model_dir), "--input", str(text), "--prompt", prompt, *shape, *extra])


def test_generate_streams_an_answer_and_writes_stats(tmp_path, tiny_model_dir, capsys):
    text = tmp_path / "book.txt"
    text.write_text("the old angler said that the river was good for fish . " * 200)
    stats_path = tmp_path / "stats.json"
    code = _generate(tiny_model_dir, text, "what fish ?", "--max-new-tokens", "5", "--stats-json", str(stats_path))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    stats = json.loads(stats_path.read_text())
    assert stats["tokens_ingested"] >= 2400 and stats["cache_tokens"] <= 96
    assert stats["cache_bytes"] < stats["full_kv_bytes"] / 10
    assert stats["generated_tokens"] <= 5 and stats["peak_rss_bytes"] > 0
    assert "tok/s" in captured.err


def test_generate_refuses_bad_settings_before_loading(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the river")
    absent = tmp_path / "absent"
    assert main(["generate", "--model", str(absent), "--input", str(text), "--prompt", "q", "--budget", "100"]) == 2
    assert "budget (100) must exceed" in capsys.readouterr().err
    empty = tmp_path / "e.txt"
    empty.write_text("")
    assert main(["generate", "--model", str(absent), "--input", str(empty), "--prompt", "q"]) == 2
    assert "is empty" in capsys.readouterr().err
    args = ["generate", "--model", str(absent), "--input", str(text), "--prompt", "q", "--read-budget", "1000"]
    assert main(args) == 2
    assert "read_budget (1000) cannot be below budget (2048)" in capsys.readouterr().err
    assert main([*args[:-2], "--observation-window", "-1"]) == 2
    assert "observation_window must be >= 0" in capsys.readouterr().err


def test_generate_refuses_a_prompt_longer_than_the_budget(tmp_path, tiny_model_dir, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the river " * 50)
    assert _generate(tiny_model_dir, text, "the fish " * 80, "--max-new-tokens", "8") == 2
    assert "does not fit the cache budget" in capsys.readouterr().err
