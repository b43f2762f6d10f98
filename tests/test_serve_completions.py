"""The full OpenAI completions API of `nugget2d serve`: every prompt form, several prompts per request,
``logprobs``/``echo`` (checked against teacher-forced scores computed directly), chat ``logprobs``,
and EleutherAI lm-eval's ``local-completions`` model (its own payload builder and parsers, and its CLI).

The fast tests share one server: the app under uvicorn on 127.0.0.1 in this process, over the same
model object the tests score with, so a log-probability the server sends can be compared with the one
:meth:`StreamingSession.score_ids` computes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from serve_helpers import AUTH, KEY, MODEL, TEXT, client, http, running_server, save_chat_model, serve_in_process

from nugget2d.runtime.generation import GenerationSettings, Scoring, TokenStream
from nugget2d.runtime.session import StreamingSession, StreamSettings
from nugget2d.serve.app import load_model
from nugget2d.serve.config import ServerConfig
from nugget2d.serve.prompts import chat_text, prompt_ids

THRESHOLD = 256  # --compress-threshold of these servers: longer prompts have all but this many tokens compressed
STREAM = StreamSettings(ratio=0.25, budget=1024, recent=64, segment=64)
SHORT = "the old angler said that the river"
LONG = TEXT * 16 + "the old angler said that the river"  # ~330 tokens: the first ~70 become nuggets
DATA = Path(__file__).parent / "data" / "lm_eval"


def _config(model_dir: Path, documents: Path) -> ServerConfig:
    return ServerConfig(
        model=str(model_dir), stream=STREAM, compress_threshold=THRESHOLD, max_tokens_cap=600, api_key=KEY,
        documents_dir=documents,
    )  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_chat_model(tmp_path_factory.mktemp("completions-model"))


@pytest.fixture(scope="module")
def loaded(model_dir) -> tuple:
    """The model and tokenizer the server answers with (the test scores with the same objects)."""
    return load_model(_config(model_dir, Path("unused")))


@pytest.fixture(scope="module")
def server(model_dir, loaded, tmp_path_factory):
    with serve_in_process(_config(model_dir, tmp_path_factory.mktemp("completions") / "documents"), loaded) as url:
        yield url


def complete(server: str, prompt, status: int = 200, **extra) -> dict:
    """``POST /v1/completions`` (greedy, 6 tokens unless ``extra`` says otherwise); the JSON answer."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0, **extra}
    response = http.post(server + "/v1/completions", json=body, headers=AUTH)
    assert response.status_code == status, response.text
    return response.json()


def ids_of(loaded, text: str) -> list[int]:
    return list(loaded[1](text).input_ids)


def session_like_the_server(loaded, prompt: list[int], max_tokens: int) -> tuple[StreamingSession, list[int]]:
    """A session in the state the server's is in before it feeds ``prompt``'s raw tail (returned):
    all but the last THRESHOLD tokens read into nuggets, then room made as for ``max_tokens`` more."""
    session = StreamingSession(*loaded, STREAM, chat=False)
    head, tail = prompt[:-THRESHOLD], prompt[-THRESHOLD:]
    if head:
        session.ingest_formatted(head, final=True)
    return session, tail


def teacher_forced(loaded, prompt: list[int], max_tokens: int) -> list[float]:
    """Log-probabilities of the raw tail's tokens after its first, teacher-forced over the same cache
    a generation reads."""
    session, tail = session_like_the_server(loaded, prompt, max_tokens)
    return session.score_ids(tail, room=len(tail) + max_tokens).tolist()


def greedy(loaded, prompt: list[int], max_tokens: int) -> list[int]:
    """The greedy tokens the same runtime generates after ``prompt``."""
    session, tail = session_like_the_server(loaded, prompt, max_tokens)
    return list(session.ask_ids(tail, GenerationSettings(max_new_tokens=max_tokens)))


def test_the_generation_loop_records_the_scores_teacher_forcing_gives(loaded):
    model, tokenizer = loaded
    prompt = ids_of(loaded, SHORT)
    session, scoring = StreamingSession(model, tokenizer, STREAM, chat=False), Scoring(top=3, prompt=True)
    tokens = list(session.ask_ids(prompt, GenerationSettings(max_new_tokens=4), scoring))
    assert [score.token for score in scoring.scores] == tokens and len(tokens) == 4
    assert [score.token for score in scoring.prompt_scores] == prompt[1:]
    assert [score.logprob for score in scoring.prompt_scores] == pytest.approx(teacher_forced(loaded, prompt, 0))
    forced = teacher_forced(loaded, prompt + tokens, 0)[-len(tokens) :]
    assert [score.logprob for score in scoring.scores] == pytest.approx(forced, abs=1e-4)
    assert all(len(s.top) == 3 and s.top[0] == (s.token, s.logprob) for s in scoring.scores)  # greedy: the likeliest

    ended = Scoring(top=1)  # the end token is recorded, though not yielded
    stream = TokenStream(
        model, StreamingSession(model, tokenizer, STREAM).cache, prompt, GenerationSettings(), [tokens[0]], ended
    )
    assert list(stream) == [] and stream.finish_reason == "stop"
    assert [(score.token, score.logprob) for score in ended.scores] == [(tokens[0], scoring.scores[0].logprob)]

    only_prompt = StreamingSession(model, tokenizer, STREAM, chat=False)  # max_new_tokens 0: fed and scored
    scoring = Scoring(prompt=True)
    assert list(only_prompt.ask_ids(prompt, GenerationSettings(max_new_tokens=0), scoring)) == []
    assert len(scoring.prompt_scores) == len(prompt) - 1 and only_prompt.stats.cache_tokens == len(prompt)


def test_every_prompt_form_gives_the_text_of_a_single_prompt(server, loaded):
    single = {text: complete(server, text)["choices"][0] for text in (SHORT, LONG)}
    assert single[SHORT]["text"] and single[LONG]["text"]
    short_ids, long_ids = ids_of(loaded, SHORT), ids_of(loaded, LONG)
    assert len(long_ids) > THRESHOLD + 64  # the long prompt is partly compressed, as a single prompt is
    for prompt, expected in [
        ([SHORT], [SHORT]),
        (short_ids, [SHORT]),
        ([short_ids], [SHORT]),
        ([SHORT, LONG, SHORT], [SHORT, LONG, SHORT]),
        ([long_ids, short_ids], [LONG, SHORT]),
    ]:
        answer = complete(server, prompt)
        assert [c["index"] for c in answer["choices"]] == list(range(len(expected)))
        assert [c["text"] for c in answer["choices"]] == [single[text]["text"] for text in expected], prompt
        assert [c["finish_reason"] for c in answer["choices"]] == [single[text]["finish_reason"] for text in expected]
        assert answer["usage"]["prompt_tokens"] == sum(len(ids_of(loaded, text)) for text in expected)

    chunks = client(server).completions.create(
        model=MODEL, prompt=[LONG, SHORT], max_tokens=6, temperature=0, stream=True
    )
    texts, reasons = ["", ""], [None, None]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == [single[LONG]["text"], single[SHORT]["text"]]
    assert reasons == [single[LONG]["finish_reason"], single[SHORT]["finish_reason"]]


def test_echo_log_probabilities_equal_teacher_forced_scores(server, loaded):
    tokenizer = loaded[1]
    short = ids_of(loaded, SHORT)
    answer = complete(server, short, echo=True, max_tokens=0, logprobs=2)["choices"][0]
    scores = answer["logprobs"]
    assert answer["text"] == tokenizer.decode(short) and answer["finish_reason"] == "length"
    assert scores["token_logprobs"][0] is None and scores["top_logprobs"][0] is None
    assert scores["token_logprobs"][1:] == pytest.approx(teacher_forced(loaded, short, 0), abs=1e-5)
    assert "".join(scores["tokens"]) == answer["text"]
    assert all(answer["text"][at:].startswith(t) for at, t in zip(scores["text_offset"], scores["tokens"]))
    for token, logprob, top in zip(scores["tokens"][1:], scores["token_logprobs"][1:], scores["top_logprobs"][1:]):
        assert top[token] == logprob and 2 <= len(top) <= 3 and max(top.values()) >= logprob

    # a long prompt: the compressed part and the first raw token are not scored, the raw tail is, over the
    # nuggets; max_tokens 1 (what lm-eval sends) adds the generated token's position
    long = ids_of(loaded, LONG)
    compressed = len(long) - THRESHOLD
    scores = complete(server, long, echo=True, max_tokens=1, logprobs=1)["choices"][0]["logprobs"]
    assert len(scores["tokens"]) == len(long) + 1
    assert scores["token_logprobs"][: compressed + 1] == [None] * (compressed + 1)
    assert scores["token_logprobs"][compressed + 1 : -1] == pytest.approx(teacher_forced(loaded, long, 1), abs=1e-5)
    last_top = scores["top_logprobs"][-1]
    assert scores["token_logprobs"][-1] == max(last_top.values())  # greedy: the generated token is the likeliest

    # generated tokens (no echo): each one's log-probability under the model, as teacher forcing gives it
    generated = greedy(loaded, short, 5)
    answer = complete(server, short, max_tokens=5, logprobs=0)["choices"][0]
    assert answer["text"] == tokenizer.decode(generated, skip_special_tokens=True)
    forced = teacher_forced(loaded, short + generated, 0)[-len(generated) :]
    assert answer["logprobs"]["token_logprobs"] == pytest.approx(forced, abs=1e-4)
    assert answer["logprobs"]["text_offset"][0] == 0 and "".join(answer["logprobs"]["tokens"]) == answer["text"]


def test_the_openai_client_reads_completion_and_chat_log_probabilities(server, loaded):
    api = client(server)
    answer = api.completions.create(model=MODEL, prompt=[SHORT, SHORT], max_tokens=0, echo=True, logprobs=1)
    first, second = answer.choices
    assert first.logprobs.tokens == second.logprobs.tokens and first.text == second.text == SHORT
    assert first.logprobs.token_logprobs[1:] == pytest.approx(
        teacher_forced(loaded, ids_of(loaded, SHORT), 0), abs=1e-5
    )
    assert len(first.logprobs.text_offset) == len(ids_of(loaded, SHORT))

    messages = [{"role": "user", "content": "what did the old angler say ?"}]
    chat = api.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    tokenizer = loaded[1]
    prompt = prompt_ids(tokenizer, chat_text(tokenizer, messages), True, True)
    generated = greedy(loaded, prompt, 5)
    content = chat.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == chat.choices[0].message.content
    forced = teacher_forced(loaded, prompt + generated, 0)[-len(generated) :]
    assert [entry.logprob for entry in content] == pytest.approx(forced, abs=1e-4)
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert bytes(entry.bytes).decode() == entry.token
    plain = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == chat.choices[0].message.content


def test_lm_eval_payloads_are_accepted_and_parsed_back(server, loaded, model_dir):
    completions = pytest.importorskip("lm_eval.models.openai_completions", reason="lm-eval (the eval extra) is absent")
    lm = completions.LocalCompletionsAPI(
        model=MODEL, base_url=server + "/v1/completions", tokenizer=str(model_dir), tokenizer_backend="huggingface",
        header=AUTH, max_retries=1, batch_size=2,
    )  # fmt: skip
    contexts = [SHORT, TEXT * 15 + SHORT]  # the second is longer than the compress threshold
    continuation = lm.tok_encode(" was good for fish")
    requests = [(None, lm.tok_encode(context), continuation) for context in contexts]
    inputs, ctxlens, _ = lm.batch_loglikelihood_requests([requests])
    outputs = lm.model_call(messages=inputs, generate=False)
    parsed = lm.parse_logprobs(outputs=outputs, tokens=inputs, ctxlens=ctxlens)
    for (logprob, _), tokens in zip(parsed, inputs):
        forced = teacher_forced(loaded, tokens, 1)[-len(continuation) :]
        assert logprob == pytest.approx(sum(forced), abs=1e-4)

    until = {"until": ["."], "max_gen_toks": 8}
    outputs = lm.model_call(messages=[lm.tok_encode(SHORT)], generate=True, gen_kwargs=until)
    assert lm.parse_generations(outputs=outputs) == [
        complete(server, SHORT, max_tokens=8, stop=[".", lm.eos_string])["choices"][0]["text"]
    ]


def test_what_cannot_be_done_is_refused_saying_what_to_do(server):
    def refused(status: int = 400, **body) -> dict:
        error = complete(server, SHORT, status=status, **body)["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
        return error

    assert "echo" in refused(max_tokens=0)["message"]
    assert "stream" in refused(logprobs=1, stream=True)["message"]
    assert "send the request 2 times" in refused(n=2)["message"]
    assert "best_of" in refused(best_of=2)["param"]
    assert refused(422, logprobs=21)["param"] == "logprobs"
    assert "empty list" in complete(server, [], status=400)["error"]["message"]
    assert "empty" in complete(server, [[3, 4], []], status=400)["error"]["message"]
    assert "[0, " in complete(server, [[3, 4], [99999]], status=400)["error"]["message"]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "the fish"}], "max_tokens": 2}
    response = http.post(server + "/v1/chat/completions", json={**chat, "top_logprobs": 2}, headers=AUTH)
    assert response.status_code == 400 and "logprobs: true" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="stream"):
        client(server).chat.completions.create(**chat, logprobs=True, stream=True)


@pytest.mark.slow
def test_lm_eval_cli_scores_a_local_task_through_a_real_server(model_dir, loaded, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval (the eval extra) is absent")
    flags = ["--budget", "1024", "--recent", "64", "--segment", "64", "--ratio", "0.25"]
    flags += ["--compress-threshold", str(THRESHOLD), "--log-level", "warning"]
    with running_server(model_dir, tmp_path / "documents", *flags) as url:
        command = [
            sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args",
            f"model={MODEL},base_url={url}/v1/completions,tokenizer={model_dir},tokenizer_backend=huggingface,"
            "max_length=1024", "--include_path", str(DATA), "--tasks", "nugget2d_angler", "--output_path",
            str(tmp_path / "results"), "--log_samples",
        ]  # fmt: skip
        environment = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        root = Path(__file__).parent.parent  # the task's data file is named relative to the repository root
        run = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=root, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    samples = [json.loads(line) for path in (tmp_path / "results").rglob("samples_*.jsonl") for line in path.open()]
    documents = [json.loads(line) for line in (DATA / "angler.jsonl").open()]
    assert len(samples) == len(documents)
    tokenizer = loaded[1]
    for sample in samples:
        document = sample["doc"]
        context = list(tokenizer(document["context"]).input_ids)
        for choice, response in zip(document["choices"], sample["filtered_resps"]):
            continuation = list(tokenizer(" " + choice).input_ids)
            forced = teacher_forced(loaded, context + continuation, 1)[-len(continuation) :]
            assert float(response[0]) == pytest.approx(sum(forced), abs=1e-4)
