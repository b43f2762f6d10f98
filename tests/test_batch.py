"""Batch jobs on Ray Data (`nugget2d qa` / `summarize`), resumable output, and `nugget2d score`."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from nugget2d.runtime.batch_io import (
    InputPlan,
    ResultFile,
    decode_line,
    document_file,
    error_row,
    jsonl_lines,
    parse_request,
    scan_input,
)
from nugget2d.runtime.batch_lock import OutputLock
from nugget2d.runtime.batch_worker import DocumentWorker, JobSettings
from nugget2d.runtime.cli import main
from nugget2d.runtime.generation import GenerationSettings
from nugget2d.runtime.session import StreamSettings

EXE = shutil.which("nugget2d", path=os.path.dirname(sys.executable))
SENTENCE = "the old angler said that the river was good for fish . "
QUESTIONS = ["what was good ?", "who said it ?", "where is the fish ?"]
CACHE = ["--ratio", "0.25", "--budget", "128", "--recent", "16", "--segment", "32"]


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray (2 CPUs, as on this machine) shared by the tests of this file."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _settings(model_dir, task: str = "qa", max_new_tokens: int = 6) -> JobSettings:
    return JobSettings(
        task=task,
        model=str(model_dir),
        stream=StreamSettings(ratio=0.25, budget=128, recent=16, segment=32),
        generation=GenerationSettings(max_new_tokens=max_new_tokens),
    )


def _write_docs(path, count: int, repeat: int = 6) -> list[dict]:
    docs = [{"id": f"doc{i}", "document": SENTENCE * (repeat + i), "questions": QUESTIONS} for i in range(count)]
    path.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    return docs


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ten_documents_three_questions_each_compressed_once(tmp_path, tiny_model_dir, ray_address):
    from nugget2d.runtime.batch import run_batch_job

    docs = _write_docs(tmp_path / "docs.jsonl", 10)
    settings = _settings(tiny_model_dir)
    report = run_batch_job(tmp_path / "docs.jsonl", tmp_path / "answers.jsonl", settings, workers=2, progress=False)

    rows = _rows(tmp_path / "answers.jsonl")
    assert len(rows) == 30 and report.rows == 30 and report.errors == 0
    assert Counter((row["id"], row["question"]) for row in rows) == {
        (doc["id"], q): 1 for doc in docs for q in QUESTIONS
    }
    assert all(set(row) >= {"id", "question", "answer", "cache_tokens", "seconds"} for row in rows)
    assert report.compressions == {f"id:{doc['id']}": 1 for doc in docs}

    # The same model in this process: reading a document alone takes exactly the encoder passes the
    # job spent on it with all three questions (none re-encoded it), and each answer equals the answer
    # to that question asked alone, so the questions did not see each other.
    reference = DocumentWorker(settings)
    for doc in docs[:3]:
        for question in QUESTIONS:
            alone = reference.run(parse_request(json.dumps({**doc, "questions": [question]}), "qa"))
            assert report.encoder_calls[f"id:{doc['id']}"] == alone.encoder_calls > 0
            (expected,) = alone.rows
            (got,) = [row for row in rows if row["id"] == doc["id"] and row["question"] == question]
            assert got["answer"] == expected["answer"] and got["cache_tokens"] == expected["cache_tokens"]


def test_bad_lines_and_failing_documents_give_error_rows(tmp_path, tiny_model_dir, ray_address):
    from nugget2d.runtime.batch import run_batch_job

    (tmp_path / "real.txt").write_text(SENTENCE * 8)
    (tmp_path / "empty.txt").write_text("")
    lines = [
        json.dumps({"id": 1, "document": SENTENCE * 6, "questions": QUESTIONS[:2]}),
        "{this is not json",
        json.dumps({"id": 2, "document_path": "nowhere.txt", "questions": QUESTIONS[:1]}),
        json.dumps({"id": 3, "questions": QUESTIONS[:1]}),  # no document at all
        json.dumps({"id": 4, "document_path": "real.txt", "questions": QUESTIONS}),
        json.dumps({"id": 5, "document_path": "empty.txt", "questions": QUESTIONS[:1]}),
        json.dumps({"id": 6, "document": SENTENCE, "questions": ["fish " * 200]}),  # cannot fit the budget
        json.dumps({"id": 1, "document": "another text", "questions": QUESTIONS}),  # repeated id
    ]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "answers.jsonl"
    report = run_batch_job(tmp_path / "docs.jsonl", out, _settings(tiny_model_dir), workers=2, progress=False)

    rows = _rows(out)
    errors = {("line", row["line"]) if "line" in row else row["id"]: row["error"] for row in rows if "error" in row}
    assert set(errors) == {("line", 2), 2, ("line", 4), 5, 6, ("line", 8)} and report.errors == 6
    assert errors["line", 2].startswith("line 2: not valid JSON")
    assert "nowhere.txt does not exist" in errors[2]
    assert "exactly one of" in errors["line", 4]
    assert "is empty" in errors[5]
    assert "does not fit the cache budget" in errors[6]
    assert "already appears on line 1" in errors["line", 8]
    answered = Counter(row["id"] for row in rows if "answer" in row)
    assert answered == {1: 2, 4: 3}
    assert report.compressions[f"id:{1}"] == 1  # the repeated id's other text was never read

    again = run_batch_job(tmp_path / "docs.jsonl", out, _settings(tiny_model_dir), workers=2, progress=False)
    assert again.documents == 0 and again.rows == 0 and _rows(out) == rows


@pytest.mark.slow
def test_killed_job_resumes_with_every_answer_exactly_once(tmp_path, tiny_model_dir, ray_address):
    from nugget2d.runtime.batch import run_batch_job

    assert EXE, "the nugget2d console script is not installed"
    docs = _write_docs(tmp_path / "docs.jsonl", 40, repeat=20)
    out = tmp_path / "answers.jsonl"
    command = [EXE, "qa", "--input", str(tmp_path / "docs.jsonl"), "--output", str(out), "--address", ray_address]
    command += ["--model", str(tiny_model_dir), "--workers", "2", "--max-new-tokens", "24", "--quiet", *CACHE]
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and job.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 6:
            break
        time.sleep(0.05)
    assert job.poll() is None, f"the job ended before it could be killed: {job.stderr.read().decode()[-2000:]}"
    settings = _settings(tiny_model_dir, max_new_tokens=24)
    with pytest.raises(ValueError, match=rf"being written by another job \(pid {job.pid} on "):
        run_batch_job(tmp_path / "docs.jsonl", out, settings, workers=2, progress=False)  # a second writer
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=30)
    job.stderr.close()

    written = _rows(out)
    assert 6 <= len(written) < 120, "the job was not killed midway"
    with out.open("a") as handle:  # as if the kill had cut a write short
        handle.write('{"id": "doc39", "question": "what was go')

    report = run_batch_job(tmp_path / "docs.jsonl", out, settings, workers=2, progress=False)
    assert report.notes and f"left by pid {job.pid} on" in report.notes[0]  # the killed job's lock
    rows = _rows(out)
    assert Counter((row["id"], row["question"]) for row in rows) == {
        (doc["id"], q): 1 for doc in docs for q in QUESTIONS
    }
    assert all("answer" in row for row in rows)
    assert report.skipped == len(written) // 3 and report.documents == 40 - report.skipped
    assert rows[: len(written)] == written  # what the killed job wrote is kept as it was


def test_summaries_over_documents_longer_than_the_window(tmp_path, tiny_model_dir, ray_address):
    from nugget2d.runtime.batch import run_batch_job

    # the tiny model's native window is 256 positions; these documents are ~900 and ~1200 tokens
    docs = [{"id": "long", "document": SENTENCE * 75}, {"id": "longer", "document": SENTENCE * 100}]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    out = tmp_path / "summaries.jsonl"
    settings = _settings(tiny_model_dir, task="summarize", max_new_tokens=8)
    report = run_batch_job(tmp_path / "docs.jsonl", out, settings, workers=2, progress=False)
    rows = sorted(_rows(out), key=lambda row: row["id"])
    assert [row["id"] for row in rows] == ["long", "longer"] and report.errors == 0
    assert all(set(row) == {"id", "summary", "cache_tokens", "seconds"} for row in rows)
    assert all(0 < row["cache_tokens"] <= 128 for row in rows)
    assert report.encoder_calls["id:longer"] > report.encoder_calls["id:long"] > 256 // 32


# --- inputs and outputs that used to lose documents or rows silently ----------------------------------


def test_lines_end_at_newline_only_bad_utf8_gets_an_error_row_and_lost_documents_fail_the_job(
    tmp_path, tiny_model_dir, ray_address, monkeypatch, capsys
):
    import nugget2d.runtime.batch as batch

    def doc(ident: str, text: str) -> bytes:  # as json.dumps(ensure_ascii=False) writes it: separators stay raw
        return json.dumps({"id": ident, "document": text, "questions": QUESTIONS[:1]}, ensure_ascii=False).encode()

    lines = [
        doc("ls", SENTENCE * 3 + "\u2028" + SENTENCE * 3),
        doc("ps", SENTENCE * 3 + "\u2029" + SENTENCE * 3),
        doc("nel", SENTENCE * 3 + "\u0085" + SENTENCE * 3),
        doc("cr", SENTENCE * 6).replace(b', "document"', b',\r"document"'),  # a lone \r between tokens
        b'{"id": "latin1", "document": "caf\xe9 ' + SENTENCE.encode() + b'", "questions": ["q"]}',
        doc("edited", SENTENCE * 6),
        doc("plain", SENTENCE * 6),
    ]
    source = tmp_path / "docs.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    scan = batch.scan_input

    def scan_then_edit(path, task):  # the input changes after the driver read it, before Ray does
        plan = scan(path, task)
        source.write_bytes(source.read_bytes().replace(b'"edited", "document": "', b'"edited", "document": "new '))
        return plan

    monkeypatch.setattr(batch, "scan_input", scan_then_edit)
    out = tmp_path / "answers.jsonl"
    command = ["qa", "--input", str(source), "--output", str(out), "--model", str(tiny_model_dir)]
    assert main([*command, "--workers", "2", "--max-new-tokens", "6", "--quiet", *CACHE]) == 2

    err = capsys.readouterr().err
    assert "5 documents done" in err and "1 documents got no rows" in err and "ids edited;" in err
    rows = {row["id"]: row for row in _rows(out)}
    assert set(rows) == {"ls", "ps", "nel", "cr", "plain", "latin1"}
    assert all("answer" in rows[ident] for ident in ("ls", "ps", "nel", "cr", "plain"))
    assert rows["latin1"]["line"] == 5 and rows["latin1"]["retryable"] is False
    assert rows["latin1"]["error"].startswith("line 5: not UTF-8 text (invalid continuation byte at byte 34 of")
    assert not (tmp_path / "answers.jsonl.lock").exists()


def test_document_paths_leading_outside_the_input_folder_are_refused(tmp_path, tiny_model_dir, ray_address):
    from nugget2d.runtime.batch import run_batch_job

    folder = tmp_path / "jobs"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "inside.txt").write_text(SENTENCE * 6)
    (tmp_path / "outside.txt").write_text(SENTENCE * 6)
    (folder / "link.txt").symlink_to(tmp_path / "outside.txt")
    paths = {
        "inside": "sub/inside.txt",
        "down_and_up": "sub/../sub/inside.txt",
        "up": "../outside.txt",
        "absolute": str(tmp_path / "outside.txt"),
        "home": "~/outside.txt",
        "symlink": "link.txt",
    }
    _jsonl(folder / "docs.jsonl", [{"id": ident, "document_path": path} for ident, path in paths.items()])
    out = folder / "summaries.jsonl"
    settings = _settings(tiny_model_dir, task="summarize", max_new_tokens=4)
    report = run_batch_job(folder / "docs.jsonl", out, settings, workers=2, progress=False)

    rows = {row["id"]: row for row in _rows(out)}
    assert "summary" in rows["inside"] and "summary" in rows["down_and_up"]
    for ident in ("up", "absolute", "home", "symlink"):
        assert rows[ident]["retryable"] is False
        assert rows[ident]["error"].startswith(f"document_path {paths[ident]!r} leads outside the input file's folder")
        assert rows[ident]["error"].endswith("or pass --allow-paths-outside to read it anyway")
    assert report.errors == 4 and report.retryable == 0


def test_transient_errors_are_retried_by_the_next_run_which_takes_over_a_dead_jobs_lock(
    tmp_path, tiny_model_dir, ray_address, capsys
):
    from nugget2d.runtime.batch import run_batch_job

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "far.txt").write_text(SENTENCE * 6)
    (tmp_path / "flaky.txt").symlink_to("/proc/self/mem")  # reading it fails with EIO, like a failing disk
    docs = [
        {"id": "inline", "document": SENTENCE * 6},
        {"id": "flaky", "document_path": "flaky.txt"},
        {"id": "far", "document_path": str(tmp_path / "elsewhere" / "far.txt")},
        {"id": "missing", "document_path": "nowhere.txt"},
    ]
    _jsonl(tmp_path / "docs.jsonl", docs)
    out = tmp_path / "summaries.jsonl"
    command = ["summarize", "--input", str(tmp_path / "docs.jsonl"), "--output", str(out), "--allow-paths-outside"]
    command += ["--model", str(tiny_model_dir), "--workers", "2", "--max-new-tokens", "4", "--quiet", *CACHE]
    assert main(command) == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.startswith("nugget2d summarize: 4 documents done") and "(2 errors, 1 retryable: run again" in summary

    rows = {row["id"]: row for row in _rows(out)}
    assert "summary" in rows["inline"] and "summary" in rows["far"]  # allowed outside the folder
    assert rows["flaky"]["retryable"] is True and "Input/output error" in rows["flaky"]["error"]
    assert rows["missing"]["retryable"] is False and "does not exist" in rows["missing"]["error"]

    (tmp_path / "flaky.txt").unlink()  # the fault is gone
    (tmp_path / "flaky.txt").write_text(SENTENCE * 6)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": "earlier"}
    (tmp_path / "summaries.jsonl.lock").write_text(json.dumps(lock))  # left by a job that was killed
    settings = _settings(tiny_model_dir, task="summarize", max_new_tokens=4)
    settings.allow_paths_outside = True
    second = run_batch_job(tmp_path / "docs.jsonl", out, settings, workers=2, progress=False)

    assert second.notes == [
        f"took over the lock {out}.lock left by pid {lock['pid']} on {lock['host']}, which no longer runs"
    ]
    assert second.documents == 1 and second.skipped == 3 and second.errors == 0
    again = {row["id"]: row for row in _rows(out)}
    assert "summary" in again["flaky"] and "error" not in again["flaky"]
    assert {ident: again[ident] for ident in ("inline", "far", "missing")} == {
        ident: rows[ident] for ident in ("inline", "far", "missing")
    }
    assert not (tmp_path / "summaries.jsonl.lock").exists()


def test_a_second_writer_of_the_same_output_is_refused(tmp_path, tiny_model_dir, ray_address):
    from nugget2d.runtime.batch import run_batch_job

    _write_docs(tmp_path / "docs.jsonl", 2)
    out = tmp_path / "answers.jsonl"
    out.write_text('{"id": "doc0", "question": "q", "answer": "written before"}\n')
    with OutputLock(out):  # another job writing it (one in another process: the slow test above)
        holder = rf"another job \(pid {os.getpid()} on {socket.gethostname()}, since .*\); wait for it to finish"
        with pytest.raises(ValueError, match=rf"output {re.escape(str(out))} is being written by {holder}"):
            run_batch_job(tmp_path / "docs.jsonl", out, _settings(tiny_model_dir), workers=2, progress=False)
    assert out.read_text() == '{"id": "doc0", "question": "q", "answer": "written before"}\n'
    assert not (tmp_path / "answers.jsonl.lock").exists()  # the holder removed its lock when done

    for holder_info, message in [
        ({"pid": 1, "host": "another-host"}, "on host another-host .* cannot tell whether that job still runs"),
        ({"pid": os.getppid(), "host": socket.gethostname()}, f"pid {os.getppid()} on this host, which still runs"),
    ]:
        (tmp_path / "answers.jsonl.lock").write_text(json.dumps(holder_info))
        with pytest.raises(ValueError, match=message):
            run_batch_job(tmp_path / "docs.jsonl", out, _settings(tiny_model_dir), workers=2, progress=False)
        assert out.read_text() == '{"id": "doc0", "question": "q", "answer": "written before"}\n'


@pytest.mark.slow
def test_summarize_command_starts_its_own_local_ray(tmp_path, tiny_model_dir):
    assert EXE, "the nugget2d console script is not installed"
    (tmp_path / "doc.txt").write_text(SENTENCE * 40)
    (tmp_path / "docs.jsonl").write_text('{"id": "a", "document_path": "doc.txt"}\n{"id": "b"}\n')
    out = tmp_path / "summaries.jsonl"
    command = [EXE, "summarize", "--input", str(tmp_path / "docs.jsonl"), "--output", str(out)]
    command += ["--model", str(tiny_model_dir), "--workers", "1", "--max-new-tokens", "8", *CACHE]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "1 documents done" in result.stderr and "(1 errors)" in result.stderr
    rows = {row["id"]: row for row in _rows(out)}
    assert set(rows["a"]) == {"id", "summary", "cache_tokens", "seconds"}
    assert rows["b"]["line"] == 2 and "exactly one of" in rows["b"]["error"]


# --- resumable output and input checks, without Ray ---------------------------------------------------


def test_output_file_drops_torn_lines_and_incomplete_documents(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        json.dumps({"id": "a", "document": "x", "questions": ["q1", "q2"]})
        + "\n"
        + json.dumps({"id": "b", "document": "y", "questions": ["q1", "q2"]})
        + "\n"
        + json.dumps({"id": "c", "document_path": "z.txt", "questions": ["q1"]})
        + "\nnot json\n"
    )
    plan = scan_input(docs, "qa")
    assert plan.expected == {"id:a": 2, "id:b": 2, "id:c": 1} and [e["line"] for e in plan.errors] == [4]
    out = ResultFile(tmp_path / "out.jsonl")
    out.append([{"id": "a", "question": "q1", "answer": "1"}, {"id": "a", "question": "q2", "answer": "2"}])
    out.append([{"id": "b", "question": "q1", "answer": "1"}])  # half a document (a cut write)
    out.append([{"id": "c", "error": "document_path z.txt does not exist"}])
    out.append(plan.errors)
    with out.path.open("a") as handle:
        handle.write('{"id": "b", "question": "q2", "ans')
    assert out.prepare(plan, "qa") == {"id:a", "id:c", "line:4"}
    assert [(row["id"], row.get("question")) for row in _rows(out.path)] == [
        ("a", "q1"),
        ("a", "q2"),
        ("c", None),
        (None, None),
    ]
    assert out.prepare(plan, "qa") == {"id:a", "id:c", "line:4"}  # nothing more to drop


def test_lines_paths_and_retryable_rows_without_ray(tmp_path):
    raw = '{"id": 1, "document": "a\u2028b\u2029c\u0085d\re"}'.encode() + b"\n\n" + b'{"id": "\xff"}'
    assert list(jsonl_lines(io.BytesIO(raw))) == [(1, raw.split(b"\n")[0] + b"\n"), (3, b'{"id": "\xff"}')]
    assert len(raw.decode("utf-8", "replace").splitlines()) == 7  # what Ray's read_text made of it
    with pytest.raises(ValueError, match="not UTF-8 text \\(invalid start byte at byte 9 of the line\\)"):
        decode_line(b'{"id": "\xff"}')

    (tmp_path / "in").mkdir()
    assert document_file("a/../b.txt", tmp_path / "in") == tmp_path.resolve() / "in" / "b.txt"
    for outside in ("../b.txt", "/etc/hostname", "~"):
        with pytest.raises(ValueError, match="leads outside the input file's folder"):
            document_file(outside, tmp_path / "in")
    assert document_file("/etc/hostname", tmp_path / "in", allow_outside=True) == Path("/etc/hostname")

    docs = tmp_path / "docs.jsonl"
    requests = [
        {"id": "a", "document": "x", "questions": ["q1", "q2"]},
        {"id": "b", "document": "y", "questions": ["q"]},
    ]
    _jsonl(docs, requests)
    out = ResultFile(tmp_path / "out.jsonl")
    out.append([{"id": "a", "question": "q1", "answer": "1"}])
    out.append([error_row("a", "OutOfMemoryError: CUDA out of memory", retryable=True) | {"question": "q2"}])
    out.append([error_row("b", "the text is empty", retryable=False)])
    assert out.prepare(scan_input(docs, "qa"), "qa") == {"id:b"}  # a is done again, b's final error stays
    assert _rows(out.path) == [{"id": "b", "error": "the text is empty", "retryable": False}]


def test_damaged_output_and_bad_requests_are_refused_clearly(tmp_path):
    damaged = tmp_path / "out.jsonl"
    damaged.write_text('{"id": 1, "answer": "x"}\n[1, 2]\n{"id": 2, "answer": "y"}\n')
    with pytest.raises(ValueError, match="line 2 is not a result row"):
        ResultFile(damaged).prepare(InputPlan(), "qa")
    for line, message in [
        ('{"id": true, "document": "x", "questions": ["q"]}', '"id" must be'),
        ('{"id": 1, "document": "x", "document_path": "y", "questions": ["q"]}', "exactly one of"),
        ('{"id": 1, "document": "x", "questions": []}', "non-empty list"),
        ('{"id": 1, "document": "x", "questions": ["q", ""]}', "every entry"),
        ("[1]", "JSON object"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_request(line, "qa")
    assert parse_request('{"id": 1, "document": "x"}', "summarize").questions == ()
    with pytest.raises(ValueError, match="does not exist"):
        scan_input(tmp_path / "missing.jsonl", "qa")


# --- scoring --------------------------------------------------------------------------------------


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_qa_scores_on_a_hand_made_gold_file(tmp_path, capsys):
    pred = _jsonl(
        tmp_path / "pred.jsonl",
        [
            {"id": "d1", "question": "door?", "answer": "It was the Blue Door."},  # contains; F1 2/3
            {"id": "d1", "question": "number?", "answer": "forty-two"},  # "fortytwo": no match
            {"id": "d2", "question": "city?", "answer": "paris"},  # exact
            {"id": "d2", "question": "animal?", "answer": "a category"},  # "cat" is not a whole word here
            {"id": "d3", "question": "where?", "error": "the question does not fit"},
        ],
    )
    gold = _jsonl(
        tmp_path / "gold.jsonl",
        [
            {"id": "d1", "question": "door?", "answers": ["the blue door"]},
            {"id": "d1", "question": "number?", "answers": ["42", "forty two"]},
            {"id": "d2", "question": "city?", "answer": "Paris"},
            {"id": "d2", "question": "animal?", "answers": ["cat"]},
            {"id": "d3", "question": "where?", "answers": ["river"]},
        ],
    )
    assert main(["score", "--task", "qa", "--pred", pred, "--gold", gold]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["examples"] == 5 and scores["missing"] == 1
    assert scores["containment"] == pytest.approx(2 / 5)
    assert scores["f1"] == pytest.approx((2 / 3 + 1) / 5)
    assert scores["exact_match"] == pytest.approx(1 / 5)


def test_summary_rouge_on_a_hand_made_gold_file(tmp_path, capsys):
    pred = _jsonl(
        tmp_path / "pred.jsonl",
        [
            {"id": 1, "summary": "the cat sat on the mat"},
            {"id": 2, "summary": "a dog ran"},
            {"id": 3, "summary": "the cat ran"},
        ],
    )
    reference = "the cat sat on the mat"
    gold = _jsonl(tmp_path / "gold.jsonl", [{"id": i, "summary": reference} for i in (1, 2, 3, 4)])
    assert main(["score", "--task", "summarize", "--pred", pred, "--gold", gold]) == 0
    scores = json.loads(capsys.readouterr().out)
    # doc 3: unigrams 2 of 3 predicted / 2 of 6 reference -> F 4/9; bigrams 1/2 and 1/5 -> F 2/7; LCS 2 -> 4/9
    assert scores["missing"] == 1
    assert scores["rouge1"] == pytest.approx((1 + 0 + 4 / 9) / 4)
    assert scores["rouge2"] == pytest.approx((1 + 0 + 2 / 7) / 4)
    assert scores["rougeL"] == pytest.approx((1 + 0 + 4 / 9) / 4)


def test_score_errors_are_one_line(tmp_path, capsys):
    pred = _jsonl(tmp_path / "pred.jsonl", [{"id": 1, "summary": "x"}])
    (tmp_path / "gold.jsonl").write_text('{"id": 1, "summary": "x"}\n{oops\n')
    assert main(["score", "--task", "summarize", "--pred", pred, "--gold", str(tmp_path / "gold.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "gold file" in err and "line 2 is not valid JSON" in err
    gold = _jsonl(tmp_path / "gold2.jsonl", [{"id": 1, "question": "q"}])
    assert main(["score", "--task", "qa", "--pred", pred, "--gold", gold]) == 2
    assert '"answers"' in capsys.readouterr().err
