"""`nugget2d serve`: the real server under uvicorn (and Ray Serve), driven by the official openai client.

Each server is the console script in a subprocess on 127.0.0.1 and a free port, serving a tiny
random Llama whose word-level tokenizer carries a small chat template.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from serve_helpers import FLAGS, KEY, MODEL, TEXT, ask, client, metric, running_server, save_chat_model
from serve_helpers import http as _http
from tiny_models import tiny_llama, tiny_tokenizer

from nugget2d.compress import Nugget2DConfig, Nugget2DModel
from nugget2d.runtime.generation import GenerationSettings
from nugget2d.runtime.session import StreamingSession, StreamSettings
from nugget2d.serve.engine import Engine
from nugget2d.serve.errors import APIError
from nugget2d.serve.metrics import Metrics


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with a 4096-token window and a chat template, as a local model directory."""
    return save_chat_model(tmp_path_factory.mktemp("serve-model"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """One server shared by the fast tests."""
    with running_server(model_dir, tmp_path_factory.mktemp("serve") / "documents", *FLAGS) as url:
        yield url


def test_openai_client_streamed_text_equals_the_whole_answer(server):
    api = client(server)
    assert [m.id for m in api.models.list()] == [MODEL]
    messages = [{"role": "user", "content": "what did the old angler say about the river ?"}]
    whole = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    chunks = list(
        api.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True)
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content and streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage == whole.usage and whole.usage.completion_tokens > 0

    prompt = "the old angler said"
    text = api.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    pieces = api.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert text.choices[0].text and "".join(p.choices[0].text for p in pieces) == text.choices[0].text


def test_a_document_is_compressed_once_and_asked_twice(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    upload = _http.post(server + "/v1/documents", headers=headers, files={"file": ("angler.txt", TEXT * 25)})
    assert upload.status_code == 201, upload.text
    doc = upload.json()
    assert doc["id"].startswith("doc-") and doc["name"] == "angler.txt"
    assert 0 < doc["cache_tokens"] < doc["tokens"] and 0 < doc["cache_bytes"] < doc["full_kv_bytes"]
    assert _http.get(f"{server}/v1/documents/{doc['id']}", headers=headers).json() == doc

    encoded = metric(server, "nugget2d_encoder_calls_total")
    question = "what is the secret code ?"
    first = ask(server, question, extra_body={"documents": [doc["id"]]})
    second = ask(server, question, extra_body={"documents": [doc["id"]]})
    assert metric(server, "nugget2d_encoder_calls_total") == encoded  # no segment was encoded again
    assert first.choices[0].message.content == second.choices[0].message.content  # the stored document is intact
    assert first.usage.prompt_tokens < doc["tokens"]  # the document was not read again as prompt

    with_system = client(server).chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "answer well"}, {"role": "user", "content": question}],
        max_tokens=4,
        extra_body={"documents": [doc["id"]]},
    )
    assert with_system.choices[0].finish_reason in ("stop", "length")

    assert _http.delete(f"{server}/v1/documents/{doc['id']}", headers=headers).json()["deleted"] is True
    assert _http.get(f"{server}/v1/documents/{doc['id']}", headers=headers).status_code == 404


def test_long_inline_context_is_compressed_automatically(server):
    encoded = metric(server, "nugget2d_encoder_calls_total")
    long = ask(server, TEXT * 20 + "what is the secret code ?", max_tokens=8)
    assert long.usage.prompt_tokens > 256
    assert metric(server, "nugget2d_encoder_calls_total") > encoded
    encoded = metric(server, "nugget2d_encoder_calls_total")
    ask(server, "what is the secret code ?", max_tokens=8)
    assert metric(server, "nugget2d_encoder_calls_total") == encoded  # a short prompt is read as it is


def test_sixteen_streams_finish_and_a_disconnect_frees_its_slot(server):
    questions = ["who had a blue book ?", "where are the fish ?"]
    expected = {q: ask(server, q, max_tokens=16).choices[0].message.content for q in questions}

    def stream(index: int) -> tuple[str, str, str | None]:
        question = questions[index % 2]
        chunks = client(server).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=16, temperature=0, stream=True
        )
        parts, reason = [], None
        for chunk in chunks:
            parts.append(chunk.choices[0].delta.content or "")
            reason = chunk.choices[0].finish_reason or reason
        return question, "".join(parts), reason

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        running = pool.map(stream, range(16))
        deadline = time.monotonic() + 30
        while not metric(server, "nugget2d_active_generations") and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        assert _http.get(server + "/health").status_code == 200
        assert time.monotonic() - started < 2  # the event loop is not stuck behind the model
        results = list(running)
    assert all(reason is not None for _, _, reason in results)
    assert all(text == expected[question] for question, text, _ in results)

    full = ask(server, "the river", max_tokens=200)
    assert full.usage.completion_tokens == 200  # without a disconnect this answer runs to max_tokens
    before = metric(server, "nugget2d_completion_tokens_total")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "the river"}], "max_tokens": 200, "stream": True}
    body["temperature"] = 0
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, headers=headers) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 20
    while metric(server, "nugget2d_active_generations") or metric(server, "nugget2d_queue_depth"):
        assert time.monotonic() < deadline, "the disconnected stream still holds its slot"
        time.sleep(0.1)
    assert metric(server, "nugget2d_completion_tokens_total") - before < 100
    assert ask(server, "the river", max_tokens=4).usage.completion_tokens == 4


def test_bad_requests_get_openai_errors_and_the_server_carries_on(server):
    url, headers = server + "/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    # greedy: with the API's default temperature (1) the tiny model may sample its end token early
    good = {"model": MODEL, "messages": [{"role": "user", "content": "the fish"}], "max_tokens": 4, "temperature": 0}

    def error(response: httpx.Response, status: int) -> dict:
        assert response.status_code == status, response.text
        body = response.json()["error"]
        assert body["message"] and body["type"]
        return body

    bad_json = _http.post(url, content=b'{"model": "nugget2d", "messages": [', headers=headers)
    assert error(bad_json, 400)["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError, match="model_not_found|does not exist"):
        client(server).chat.completions.create(model="gpt-4", messages=good["messages"])
    with pytest.raises(openai.UnprocessableEntityError) as negative:
        client(server).chat.completions.create(model=MODEL, messages=good["messages"], max_tokens=-5)
    assert negative.value.body["param"] == "max_tokens"
    assert error(_http.post(url, json={**good, "max_tokens": 601}, headers=headers), 400)["param"] == "max_tokens"
    unknown = _http.post(url, json={**good, "documents": ["doc-" + "0" * 24]}, headers=headers)
    assert error(unknown, 404)["code"] == "document_not_found"
    assert error(_http.get(server + "/v1/documents/doc-nope", headers=headers), 404)["code"] == "document_not_found"
    oversize = {**good, "messages": [{"role": "user", "content": "fish " * 20000}]}
    assert error(_http.post(url, json=oversize, headers=headers), 413)["code"] == "request_too_large"
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").chat.completions.create(model=MODEL, messages=good["messages"])
    assert error(_http.post(url, json=good), 401)["code"] == "invalid_api_key"

    assert _http.get(server + "/health").json()["status"] == "ok"
    assert _http.post(url, json=good, headers=headers).json()["usage"]["completion_tokens"] == 4


def test_forked_and_reloaded_sessions_answer_as_the_original(tmp_path):
    model = Nugget2DModel.from_base(tiny_llama(), Nugget2DConfig(scorer_layer=1)).eval()
    settings = GenerationSettings(max_new_tokens=12)
    for words in (8, 120):  # a short text (layers share tensors) and one that makes nuggets
        original = StreamingSession(model, tiny_tokenizer(), StreamSettings(0.25, 200, 32, 32), chat=False)
        original.ingest(" ".join(TEXT.split()[:words] * (1 + words // 20)))
        nbytes, stats = original.cache.nbytes, original.stats.to_dict()
        first = list(original.fork().ask("the secret code ?", settings))
        assert list(original.fork().ask("the secret code ?", settings)) == first
        assert (original.cache.nbytes, original.stats.to_dict()) == (nbytes, stats)
        reloaded = StreamingSession.load(original.save(tmp_path / str(words)), model, tiny_tokenizer())
        assert reloaded.stats.to_dict() == stats and reloaded.cache.nbytes == nbytes
        assert list(reloaded.ask("the secret code ?", settings)) == first


def test_the_worker_answers_429_when_its_queue_is_full_and_503_past_the_timeout():
    release = threading.Event()

    def blocked():
        while not release.is_set():
            time.sleep(0.01)
            yield None
        yield "done"

    async def scenario():
        engine = Engine(slots=1, max_queue=1, timeout_s=0.5, metrics=Metrics())
        engine.start()
        try:
            running = engine.submit(blocked)
            while not engine.active:
                await asyncio.sleep(0.01)
            engine.submit(blocked)  # waits for the slot
            with pytest.raises(APIError) as full:
                engine.submit(blocked)
            assert full.value.status == 429
            with pytest.raises(APIError) as late:
                async for _ in running:
                    pass
            assert late.value.status == 503 and late.value.code == "timeout"
        finally:
            release.set()
            engine.stop()

    asyncio.run(scenario())


def test_a_restart_keeps_uploaded_documents(model_dir, tmp_path):
    documents, headers = tmp_path / "documents", {"Authorization": f"Bearer {KEY}"}
    with running_server(model_dir, documents, *FLAGS) as url:
        doc = _http.post(url + "/v1/documents", json={"text": TEXT * 20}, headers=headers).json()
        before = ask(url, "who had the book ?", extra_body={"documents": [doc["id"]]}).choices[0].message.content
    with running_server(model_dir, documents, *FLAGS) as url:
        assert _http.get(f"{url}/v1/documents/{doc['id']}", headers=headers).json() == doc
        assert [d["id"] for d in _http.get(url + "/v1/documents", headers=headers).json()["data"]] == [doc["id"]]
        after = ask(url, "who had the book ?", extra_body={"documents": [doc["id"]]}).choices[0].message.content
        assert metric(url, "nugget2d_encoder_calls_total") == 0
    assert after == before


@pytest.mark.slow
def test_ray_serve_with_two_replicas_answers(model_dir, tmp_path):
    flags = [*FLAGS, "--ray", "--replicas", "2", "--replica-cpus", "0.5"]
    headers = {"Authorization": f"Bearer {KEY}"}
    with running_server(model_dir, tmp_path / "documents", *flags, timeout=400) as url:
        replicas, deadline = set(), time.monotonic() + 120  # the second replica may still be loading its model
        while len(replicas) < 2 and time.monotonic() < deadline:
            replicas |= {_http.get(url + "/health", headers=headers).json()["pid"] for _ in range(30)}
        assert len(replicas) == 2
        answer = ask(url, "where are the fish ?", max_tokens=8)
        assert answer.usage.completion_tokens > 0 and answer.choices[0].message.content
        doc = _http.post(url + "/v1/documents", json={"text": TEXT * 5}, headers=headers).json()
        for _ in range(4):  # whichever replica answers reads the document from the shared directory
            assert ask(url, "who had the book ?", max_tokens=4, extra_body={"documents": [doc["id"]]}).choices
