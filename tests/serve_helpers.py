"""What the server tests share: the tiny chat model, starting servers (a subprocess as a user
would, or uvicorn in this process for tests that watch the internals), and the HTTP clients."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from tiny_models import save_tiny_model, tiny_tokenizer

EXE = shutil.which("nugget2d", path=os.path.dirname(sys.executable))
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "nugget2d"
# A default system turn when none is given, like SmolLM2's template: documents open with it.
TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}system : you are a good angler .{% endif %}"
    "{% for m in messages %} {{ m['role'] }} : {{ m['content'] }} .{% endfor %}"
    "{% if add_generation_prompt %} assistant :{% endif %}"
)
CACHE_FLAGS = [
    "--budget", "1024", "--recent", "64", "--segment", "64", "--ratio", "0.25", "--compress-threshold", "256",
]  # fmt: skip
FLAGS = [
    *CACHE_FLAGS, "--max-tokens-cap", "600", "--slots", "4",
    "--max-body-mb", "0.0625", "--api-key", KEY, "--log-level", "warning",
]  # fmt: skip
TEXT = "the old angler said that the river was good for fish . he had a blue book and a secret code . "

# httpx defaults to 5 s; on a loaded machine compressing a document takes longer
http = httpx.Client(timeout=60)


def save_chat_model(directory: Path) -> Path:
    """A tiny Llama with a 4096-token window and a chat template, as a local model directory."""
    save_tiny_model(directory, max_position_embeddings=4096)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


def tiny_server_config(model_dir: Path, documents: Path, budget: int, threshold: int, cap: int, **overrides):
    """A ``ServerConfig`` for the tiny chat model: ratio 0.25, ``budget`` entries (64 recent, 64-token
    segments), prompts over ``threshold`` tokens compressed, at most ``cap`` new tokens."""
    from nugget2d.runtime.session import StreamSettings
    from nugget2d.serve.config import ServerConfig

    stream = StreamSettings(ratio=0.25, budget=budget, recent=64, segment=64)
    return ServerConfig(
        model=str(model_dir), stream=stream, compress_threshold=threshold, max_tokens_cap=cap,
        documents_dir=documents, **overrides,
    )  # fmt: skip


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    """A running ``nugget2d serve`` subprocess."""

    url: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        """Ctrl-C, as a user stops it; killed if it has not exited a minute later."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def serve_process(
    model_dir: Path, documents: Path, *flags: str, timeout: float = 120, env: dict[str, str] | None = None
) -> Iterator[Server]:
    """Start `nugget2d serve` as a user would; yield it once ``/health`` answers; stop it at the end."""
    assert EXE, "the nugget2d console script is not installed"
    port = free_port()
    log_path = documents.parent / f"server-{port}.log"
    command = [EXE, "serve", "--model", str(model_dir), "--port", str(port), "--documents-dir", str(documents)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [*command, *flags], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, f"the server exited early:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the server did not come up:\n{log_path.read_text()[-3000:]}"
            try:
                if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        yield server
    finally:
        server.stop()


@contextmanager
def running_server(model_dir: Path, documents: Path, *flags: str, timeout: float = 120) -> Iterator[str]:
    """:func:`serve_process`, yielding only the base URL."""
    with serve_process(model_dir, documents, *flags, timeout=timeout) as server:
        yield server.url


@contextmanager
def serve_in_process(config, loaded: tuple) -> Iterator[str]:
    """The app of ``config`` under uvicorn on a thread of this process (so a test can watch and
    perturb its internals); yields the base URL."""
    import uvicorn

    from nugget2d.serve.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(config, loaded), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def client(url: str, key: str = KEY) -> openai.OpenAI:
    """The official client against ``url``, without retries."""
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def metric(url: str, name: str, headers: dict[str, str] = AUTH) -> float:
    """One unlabelled sample of the server's Prometheus metrics."""
    response = http.get(url + "/metrics", headers=headers)
    assert response.status_code == 200, response.text
    found = re.search(rf"^{name} (\S+)$", response.text, re.MULTILINE)
    assert found, f"{name} missing from /metrics"
    return float(found.group(1))


def ask(url: str, question: str, max_tokens: int = 16, **extra) -> openai.types.chat.ChatCompletion:
    """A greedy chat completion of one user message."""
    messages = [{"role": "user", "content": question}]
    return client(url).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, **extra
    )


def upload(url: str, text: str, headers: dict[str, str] = AUTH) -> httpx.Response:
    """``POST /v1/documents`` with ``text`` as JSON."""
    return http.post(url + "/v1/documents", json={"text": text}, headers=headers)
