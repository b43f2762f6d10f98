"""The RULER plot and table are built from ``bench quality`` records: scores per task, length, method and
fraction kept, the record with more samples winning a duplicate, and the README's table rewritten in place."""

from __future__ import annotations

import json

import pytest

from nugget2d.runtime import bench_ruler_plot


def _record(method: str, ratio: float, scores: dict[str, list[float]], context: int = 4096) -> dict:
    answers = [{"task": task, "index": i, "score": s} for task, values in scores.items() for i, s in enumerate(values)]
    return {
        "method": method,
        "ratio": ratio,
        "context": context,
        "ruler": {task: sum(values) / len(values) for task, values in scores.items()},
        "ruler_answers": answers,
    }


@pytest.fixture
def records(tmp_path):
    """Two runs: a 4k sweep (two tasks, two ratios) and an older 4k run over fewer samples."""
    sweep = [
        _record("full", 1.0, {"niah_single_1": [1, 1, 1, 1], "ruler_vt": [0.4, 0.6, 1, 1]}),
        _record("nugget2d", 0.1, {"niah_single_1": [1, 0, 1, 0], "ruler_vt": [0, 0, 0.2, 0.2]}),
        _record("nugget2d", 0.25, {"niah_single_1": [1, 1, 1, 0], "ruler_vt": [0.4, 0, 0.2, 0.2]}),
        _record("kvpress:KVzip", 0.1, {"niah_single_1": [1, 1, 1, 1], "ruler_vt": [1, 1, 1, 1]}),
    ]
    older = [_record("nugget2d", 0.1, {"niah_single_1": [0]}), _record("streaming", 0.5, {"niah_single_1": [1, 0]})]
    machine = {"model": "tiny", "cpu": "test CPU", "cpu_count": 2, "torch_threads": 1}
    for name, recs in (("sweep", sweep), ("older", older)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "quality.json").write_text(json.dumps({"machine": machine, "records": recs}))
    return tmp_path


def test_scores_keep_every_task_and_the_record_over_more_samples(records):
    rows = bench_ruler_plot.scores(sorted(records.rglob("quality.json")))
    found = {(r.task, r.method, r.ratio): (r.score, r.samples) for r in rows}
    assert found[("niah_single_1", "nugget2d", 0.1)] == (0.5, 4)  # the sweep's 4 samples, not the older 1
    assert found[("ruler_vt", "nugget2d", 0.25)] == (pytest.approx(0.2), 4)
    assert found[("niah_single_1", "streaming", 0.5)] == (0.5, 2)
    assert len(rows) == 9 and {r.length for r in rows} == {4096}


def test_table_has_a_row_per_task_and_method_and_a_column_per_ratio(records):
    rows = bench_ruler_plot.scores(sorted(records.rglob("quality.json")))
    lines = bench_ruler_plot.table(rows, (0.1, 0.25)).splitlines()
    assert lines[0] == "| task | length | method | 10% kept (samples) | 25% kept (samples) |"
    assert "| niah_single_1 | 4,096 | full KV | 1.00 (4) | 1.00 (4) |" in lines  # full KV keeps everything
    assert "| niah_single_1 | 4,096 | **nugget2d** | 0.50 (4) | 0.75 (4) |" in lines
    assert "| ruler_vt | 4,096 | kvpress KVzip | 1.00 (4) | — |" in lines
    assert not any("StreamingLLM" in line for line in lines)  # ran at 50 % only: nothing in these columns
    assert len(lines) == 2 + 6


def test_main_writes_the_plot_and_table_and_rewrites_the_readme_between_its_markers(records, capsys):
    readme = records / "README.md"
    readme.write_text(f"intro\n{bench_ruler_plot.START}\nold table\n{bench_ruler_plot.END}\nafter\n")
    assert bench_ruler_plot.main([str(records)]) == 0
    table = (records / "table.md").read_text()
    assert (records / "ruler.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = readme.read_text()
    assert text == f"intro\n{bench_ruler_plot.START}\n{table}{bench_ruler_plot.END}\nafter\n"
    assert bench_ruler_plot.main([str(records)]) == 0 and readme.read_text() == text  # idempotent


def test_main_refuses_a_folder_without_ruler_records(tmp_path, capsys):
    assert bench_ruler_plot.main([str(tmp_path)]) == 1
    assert "no RULER records" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no compressing method"):
        bench_ruler_plot.plot([bench_ruler_plot.Score("t", 512, "full", 1.0, 1.0, 1, "x")], tmp_path / "p.png")
