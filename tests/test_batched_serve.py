"""Batched decoding in `nugget2d serve`: concurrent streamed answers (over a document, a long prompt
compressed inline, plain prompts) decode in shared forward passes and each stream's text equals its
solo run. The server is the console script on 127.0.0.1, driven by the official openai client."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest
from serve_helpers import (
    FLAGS,
    KEY,
    MODEL,
    TEXT,
    client,
    metric,
    running_server,
    save_chat_model,
    serve_in_process,
    upload,
)

from nugget2d.runtime.session import StreamSettings
from nugget2d.serve.app import load_model
from nugget2d.serve.config import ServerConfig


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_chat_model(tmp_path_factory.mktemp("batched-model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory) -> str:
    documents = tmp_path_factory.mktemp("batched") / "documents"
    with running_server(model_dir, documents, *FLAGS, "--slots", "8", "--max-batch", "8") as url:
        yield url


def _stream(url: str, request: dict) -> str:
    """One streamed request (chat or completion) through the openai client; its text."""
    api, kind = client(url), request["kind"]
    common = {"model": MODEL, "max_tokens": request["max_tokens"], "temperature": 0, "stream": True}
    if kind == "chat":
        extra = {"extra_body": {"documents": [request["document"]]}} if "document" in request else {}
        messages = [{"role": "user", "content": request["text"]}]
        chunks = api.chat.completions.create(messages=messages, **common, **extra)
        return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    chunks = api.completions.create(prompt=request["text"], **common)
    return "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)


def test_concurrent_streams_decode_together_and_each_equals_its_solo_run(server):
    document = upload(server, TEXT * 12)
    assert document.status_code == 201, document.text
    doc_id = document.json()["id"]
    requests = [
        {"kind": "chat", "text": "what is the secret code ?", "document": doc_id, "max_tokens": 24},
        {"kind": "chat", "text": "who had a blue book ?", "document": doc_id, "max_tokens": 17},
        {"kind": "chat", "text": "where are the fish ?", "max_tokens": 30},
        {"kind": "completion", "text": TEXT * 18 + "the secret code is", "max_tokens": 20},  # compressed inline
        {"kind": "completion", "text": "the old angler said", "max_tokens": 26},
        {"kind": "completion", "text": "she had a blue", "max_tokens": 9},
    ]
    solo = [_stream(server, request) for request in requests]  # one at a time: each decodes alone
    assert all(solo)
    passes, rows = metric(server, "nugget2d_decode_batch_rows_count"), metric(server, "nugget2d_decode_batch_rows_sum")
    assert rows == passes  # alone, every pass decoded one answer

    twice = requests * 2
    with concurrent.futures.ThreadPoolExecutor(len(twice)) as pool:
        together = list(pool.map(lambda request: _stream(server, request), twice))
    assert together == solo * 2
    passes = metric(server, "nugget2d_decode_batch_rows_count") - passes
    rows = metric(server, "nugget2d_decode_batch_rows_sum") - rows
    assert rows / passes > 1.5, f"{rows} rows in {passes} passes: the streams were not batched"


def test_batching_off_answers_the_same(server, model_dir, tmp_path: Path):
    """``max_batch=1`` (``--max-batch 1``): every answer decodes alone, in turn, as before batching existed."""
    requests = [
        {"kind": "chat", "text": "where are the fish ?", "max_tokens": 12},
        {"kind": "completion", "text": "the old angler said", "max_tokens": 12},
    ]
    batched = [_stream(server, request) for request in requests]
    shape = StreamSettings(budget=1024, recent=64, segment=64, ratio=0.25)  # as FLAGS say
    config = ServerConfig(
        model=str(model_dir), stream=shape, compress_threshold=256, max_tokens_cap=600, api_key=KEY,
        documents_dir=tmp_path / "documents", max_batch=1,
    )  # fmt: skip
    with serve_in_process(config, load_model(config)) as url:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            alone = list(pool.map(lambda request: _stream(url, request), requests * 2))
        assert metric(url, "nugget2d_decode_batch_rows_count") == 0  # no batcher at all
    assert alone == batched * 2
