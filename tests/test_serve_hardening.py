"""`nugget2d serve` under attack and faults: keys, leaked internals, overload, shutdown, storage.

One subprocess server (started as a user would, its key in the environment, not on the command
line) serves the tests that need only HTTP; the last of them stops it with Ctrl-C. Tests that
perturb the internals (a load that races a delete, a damaged document, fsync) run the app under
uvicorn in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from serve_helpers import (
    AUTH,
    CACHE_FLAGS,
    KEY,
    MODEL,
    TEXT,
    ask,
    http,
    metric,
    save_chat_model,
    serve_in_process,
    serve_process,
    tiny_server_config,
    upload,
)

from nugget2d.runtime.session import StreamingSession
from nugget2d.serve import cli
from nugget2d.serve.app import load_model
from nugget2d.serve.config import ServerConfig
from nugget2d.serve.engine import Engine
from nugget2d.serve.errors import APIError
from nugget2d.serve.metrics import Metrics

METRICS_KEY = "metrics-secret"
METRICS_AUTH = {"Authorization": f"Bearer {METRICS_KEY}"}
HEX = "0123456789abcdef" * 2
# on disk TEXT takes ~38 kB, TEXT * 5 ~134 kB, TEXT * 20 ~183 kB: two of TEXT fit, TEXT beside TEXT * 5 does not,
# TEXT * 20 alone does not
QUOTA_MB = 0.15
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "the river"}], "max_tokens": 600, "temperature": 0}
SHORT = {"model": MODEL, "messages": [{"role": "user", "content": "the fish"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """The tiny chat model as a local model directory."""
    return save_chat_model(tmp_path_factory.mktemp("serve-model"))


@pytest.fixture(scope="module")
def leftovers(tmp_path_factory) -> dict[str, Path]:
    """A documents folder holding what crashed writers and deleters leave behind, and a folder a
    live writer (this process) is still staging."""
    documents = tmp_path_factory.mktemp("hardened") / "documents"
    found = {
        "crashed": documents / f".staging-doc-{HEX[:24]}",
        "dead_writer": documents / f".staging-{2**22 + 1}-{socket.gethostname()}-doc-{HEX[1:25]}",
        "deleted": documents / f".deleted-doc-{HEX[2:26]}-0badc0de",
        "live_writer": documents / f".staging-{os.getpid()}-{socket.gethostname()}-doc-{HEX[3:27]}",
    }
    for folder in found.values():
        folder.mkdir(parents=True)
        (folder / "cache.safetensors").write_bytes(b"\0" * 1000)
    return found


@pytest.fixture(scope="module")
def server(model_dir, leftovers):
    """The hardened server: one slot, one queue place, document limits, keys from the environment
    and a file."""
    documents = leftovers["crashed"].parent
    key_file = documents.parent / "metrics.key"
    key_file.write_text(METRICS_KEY + "\n")
    flags = [
        *CACHE_FLAGS, "--max-tokens-cap", "600", "--slots", "1", "--max-queue", "1", "--timeout", "120",
        "--max-documents", "2", "--documents-quota-mb", str(QUOTA_MB), "--metrics-key-file", str(key_file),
        "--log-level", "warning",
    ]  # fmt: skip
    with serve_process(model_dir, documents, *flags, env={"NUGGET2D_API_KEY": KEY}) as running:
        yield running


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_only_bare_liveness_is_open_and_keys_stay_off_the_command_line(server):
    url = server.url
    assert http.get(url + "/health").json() == {"status": "ok"}
    detail = http.get(url + "/health", headers=AUTH).json()
    assert detail["pid"] == server.process.pid and {"active", "waiting", "documents_in_memory"} <= detail.keys()
    assert http.get(url + "/health", headers=METRICS_AUTH).json()["pid"] == server.process.pid
    assert _error(http.get(url + "/metrics"), 401)["code"] == "invalid_api_key"
    assert http.get(url + "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert "nugget2d_queue_depth" in http.get(url + "/metrics", headers=METRICS_AUTH).text
    assert "nugget2d_queue_depth" in http.get(url + "/metrics", headers=AUTH).text
    assert http.get(url + "/v1/models", headers=METRICS_AUTH).status_code == 401  # the metrics key opens nothing else
    assert http.get(url + "/openapi.json").status_code == 401
    assert http.get(url + "/v1/models", headers=AUTH).json()["data"][0]["id"] == MODEL
    command_line = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
    assert KEY.encode() not in command_line and METRICS_KEY.encode() not in command_line


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("repetition_penalty", "Infinity"),
        ("repetition_penalty", 1e6),
        ("temperature", "NaN"),
        ("top_k", 1e8),
        ("top_p", "-Infinity"),
    ],
)
def test_out_of_range_sampling_values_are_422_naming_the_field(server, field, value):
    body = json.dumps(SHORT)[:-1] + f', "{field}": {value}}}'  # a raw JSON literal: Infinity and NaN too
    response = http.post(server.url + "/v1/chat/completions", content=body, headers=AUTH)
    error = _error(response, 422)
    assert error["param"] == field and error["code"] == "invalid_value"


def test_sampling_values_at_their_bounds_are_served(server):
    for extra in ({"seed": 2**63 - 1}, {"seed": -(2**63)}, {"top_k": 50, "temperature": 1}, {"repetition_penalty": 2}):
        response = http.post(server.url + "/v1/chat/completions", json={**SHORT, **extra}, headers=AUTH)
        assert response.status_code == 200, (extra, response.text)


def _stream_until_first_token(url: str) -> tuple[httpx.Response, Iterator[str]]:
    """Start the long streamed answer; return its response and lines once it is running."""
    request = http.build_request("POST", url + "/v1/chat/completions", json={**LONG, "stream": True}, headers=AUTH)
    response = http.send(request, stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    assert next(lines).startswith("data: ")
    return response, lines


def _queue_one(url: str, results: list) -> threading.Thread:
    """Send a short request on a thread; it lands in the queue behind the running one."""

    def send() -> None:
        started = time.monotonic()
        results.append((http.post(url + "/v1/chat/completions", json=SHORT, headers=AUTH), time.monotonic() - started))

    thread = threading.Thread(target=send)
    thread.start()
    deadline = time.monotonic() + 30
    while metric(url, "nugget2d_queue_depth") < 1:
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.05)
    return thread


def test_a_full_queue_answers_429_with_retry_after(server):
    running, _ = _stream_until_first_token(server.url)
    queued: list = []
    try:
        thread = _queue_one(server.url, queued)
        refused = http.post(server.url + "/v1/chat/completions", json=SHORT, headers=AUTH)
        assert _error(refused, 429)["code"] == "queue_full"
        assert int(refused.headers["Retry-After"]) >= 1
    finally:
        running.close()  # hanging up frees the slot for the queued request
    thread.join(timeout=60)
    assert queued and queued[0][0].status_code == 200


def test_leftover_staging_and_deleted_folders_are_cleaned_at_start(server, leftovers):
    assert not leftovers["crashed"].exists() and not leftovers["dead_writer"].exists()
    assert not leftovers["deleted"].exists()
    assert leftovers["live_writer"].is_dir()  # a writer that is still running keeps its folder


def test_document_count_and_bytes_limits_answer_507_and_413(server):
    url = server.url
    first = upload(url, TEXT)
    assert first.status_code == 201, first.text
    over_bytes = _error(upload(url, TEXT * 5), 507)
    assert over_bytes["code"] == "documents_quota" and "MiB" in over_bytes["message"]
    second = upload(url, TEXT)
    assert second.status_code == 201, second.text
    started = time.monotonic()
    assert _error(upload(url, TEXT), 507)["code"] == "documents_quota"  # --max-documents 2
    assert time.monotonic() - started < 2  # refused before it is compressed
    assert http.delete(f"{url}/v1/documents/{second.json()['id']}", headers=AUTH).status_code == 200
    assert _error(upload(url, TEXT * 20), 413)["code"] == "document_too_large"
    assert [d["id"] for d in http.get(url + "/v1/documents", headers=AUTH).json()["data"]] == [first.json()["id"]]
    assert ask(url, "who had a book ?", max_tokens=2, extra_body={"documents": [first.json()["id"]]}).choices


def test_ctrl_c_answers_queued_requests_503_at_once(server):
    """Last: it stops the shared server."""
    running, lines = _stream_until_first_token(server.url)
    queued: list = []
    try:
        thread = _queue_one(server.url, queued)
        server.process.send_signal(signal.SIGINT)
        thread.join(timeout=60)
        assert queued, "the queued request got no answer"
        response, _ = queued[0]
        assert _error(response, 503)["code"] == "shutting_down"
        assert next(line for line in lines if line).startswith("data: ")  # the running answer goes on
    finally:
        running.close()
    server.process.wait(timeout=60)


# --- the app in this process ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(model_dir) -> tuple:
    """The tiny model and tokenizer, loaded once for the in-process servers."""
    return load_model(_config(model_dir, Path("unused")))


def _config(model_dir: Path, documents: Path, **overrides) -> ServerConfig:
    return tiny_server_config(model_dir, documents, 1024, 256, 600, **overrides)


def test_a_damaged_document_or_a_failing_disk_is_a_500_with_a_request_id_and_no_internals(
    model_dir, loaded, tmp_path, caplog
):
    documents = tmp_path / "documents"
    config = _config(model_dir, documents, document_memory_bytes=1)  # every request reads the document from disk
    with serve_in_process(config, loaded) as url:
        doc = upload(url, TEXT, headers={}).json()["id"]
        (documents / doc / "session.json").write_text("{")
        body = {**SHORT, "documents": [doc]}
        response = http.post(url + "/v1/chat/completions", json=body)
        error = _error(response, 500)
        request_id = response.headers["X-Request-ID"]
        assert request_id in error["message"] and error["code"] == "document_damaged"
        assert str(tmp_path) not in response.text and "JSONDecodeError" not in response.text
        assert any(request_id in r.getMessage() and r.exc_info for r in caplog.records)  # logged with its traceback

        for damaged in documents.iterdir():  # the disk gives way: the documents folder is now a file
            damaged.rename(tmp_path / damaged.name)
        documents.rmdir()
        documents.write_text("not a folder")
        caplog.clear()
        response = http.post(url + "/v1/documents", json={"text": TEXT})
        error = _error(response, 500)
        assert response.headers["X-Request-ID"] in error["message"] and error["code"] == "internal_error"
        assert str(tmp_path) not in response.text and "Error" not in error["message"]
        assert any(response.headers["X-Request-ID"] in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_request_racing_a_delete_gets_404_and_leaves_nothing_in_memory(model_dir, loaded, tmp_path, monkeypatch):
    documents = tmp_path / "documents"
    with serve_in_process(_config(model_dir, documents), loaded) as url:
        docs = [upload(url, TEXT, headers={}).json()["id"] for _ in range(2)]
    real_load = StreamingSession.load
    entered, release = threading.Event(), threading.Event()
    where = {}

    def racing_load(directory, model, tokenizer):  # the delete lands while the worker reads the document
        if where["when"] == "before":
            entered.set()
            release.wait(30)
            return real_load(directory, model, tokenizer)
        session = real_load(directory, model, tokenizer)
        entered.set()
        release.wait(30)
        return session

    monkeypatch.setattr(StreamingSession, "load", staticmethod(racing_load))
    with serve_in_process(_config(model_dir, documents), loaded) as url:  # a restart: the documents are on disk only
        for doc, when in zip(docs, ("before", "after")):
            where["when"], results = when, []
            entered.clear()
            release.clear()
            asking = threading.Thread(
                target=lambda d=doc, out=results: out.append(
                    http.post(url + "/v1/chat/completions", json={**SHORT, "documents": [d]})
                )
            )
            asking.start()
            try:
                assert entered.wait(30), "the request never read the document"
                assert http.delete(f"{url}/v1/documents/{doc}").status_code == 200
            finally:
                release.set()
                asking.join(60)
            assert _error(results[0], 404)["code"] == "document_not_found", when
            assert str(tmp_path) not in results[0].text
            assert http.get(url + "/health").json()["documents_in_memory"] == 0, when  # not brought back


def test_documents_are_fsynced_before_they_are_announced(model_dir, loaded, tmp_path, monkeypatch):
    documents = tmp_path / "documents"
    synced: list[str] = []
    real_fsync = os.fsync

    def watched_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", watched_fsync)
    with serve_in_process(_config(model_dir, documents), loaded) as url:
        doc = upload(url, TEXT, headers={}).json()["id"]
    files = sorted(path.name for path in (documents / doc).iterdir())
    assert {"cache.safetensors", "meta.json", "session.json"} <= set(files)
    staged = {Path(path).name for path in synced if Path(path).parent.name.startswith(".staging-")}
    assert staged >= set(files)  # every file, before the rename that publishes the document
    assert any(Path(path).name.startswith(".staging-") for path in synced)  # and the folder holding them
    assert str(documents) in synced  # the rename itself


def _config_of(*flags: str) -> ServerConfig:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.config_from(parser.parse_args(list(flags)))


def test_keys_come_from_a_file_or_the_environment_and_never_empty(tmp_path, monkeypatch):
    monkeypatch.delenv("NUGGET2D_API_KEY", raising=False)
    monkeypatch.delenv("NUGGET2D_METRICS_KEY", raising=False)
    assert _config_of().api_key is None
    secret = tmp_path / "key"
    secret.write_text("s3cret\n")
    assert _config_of("--api-key-file", str(secret)).api_key == "s3cret"
    assert _config_of("--metrics-key-file", str(secret)).metrics_key == "s3cret"
    monkeypatch.setenv("NUGGET2D_API_KEY", "from-env")
    monkeypatch.setenv("NUGGET2D_METRICS_KEY", "metrics-env")
    config = _config_of()
    assert (config.api_key, config.metrics_key) == ("from-env", "metrics-env")
    assert _config_of("--api-key-file", str(secret)).api_key == "s3cret"  # a flag wins over the environment
    with pytest.raises(ValueError, match="--api-key-file"):
        _config_of("--api-key", "x", "--api-key-file", str(secret))
    secret.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        _config_of("--api-key-file", str(secret))
    with pytest.raises(ValueError, match="cannot read"):
        _config_of("--api-key-file", str(tmp_path / "missing"))


def test_stopping_the_worker_answers_waiting_jobs_at_once_not_at_their_deadline():
    """What Ray Serve does to a replica it takes down (the lifespan's end stops the worker)."""
    release = threading.Event()

    def blocked():
        while not release.is_set():
            time.sleep(0.01)
            yield None

    async def scenario() -> None:
        engine = Engine(slots=1, max_queue=1, timeout_s=60, metrics=Metrics())
        engine.start()
        try:
            engine.submit(blocked)
            while not engine.active:
                await asyncio.sleep(0.01)
            waiting = engine.submit(blocked)
            await asyncio.to_thread(engine.stop)
            with pytest.raises(APIError) as refused:
                await asyncio.wait_for(waiting.__aiter__().__anext__(), timeout=5)
            assert refused.value.status == 503
        finally:
            release.set()

    asyncio.run(scenario())
