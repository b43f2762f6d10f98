"""Serving throughput with batched decoding on and off: `nugget2d serve` over real HTTP, the official
`openai` client, 1, 4, 8 and 16 concurrent streamed chat answers (half over an uploaded document, half
plain prompts): ``max(level, --min-requests)`` answers per level, taken in turn by ``level`` workers.

One server per mode (``--max-batch 16``: batched decoding; ``--max-batch 1``: every answer decodes
alone, in turn), both up at once; each level runs ``--repeats`` times per mode, the modes alternating
(A B B A) so both see the same load. Per level: aggregate completion tokens/s (prefill included),
aggregate decode tokens/s (after each answer's first token), per-request latency p50/p95 (request sent
to last chunk), time to first token p50 and the 1-minute load average. Greedy answers, so both modes
generate the same tokens. Writes ``serving.json`` and ``serving.png`` next to this file (or ``--out``).

    .venv/bin/python benchmarks/serving/bench_serve.py            # default model, about 20 minutes
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
KEY = "bench-key"
QUESTIONS = [
    "Tell me a long story about a river and an old fisherman.",
    "Describe, step by step, how to bake bread at home.",
    "Write a letter to a friend about a summer in the mountains.",
    "Explain how a steam engine works, in detail.",
    "What happens in the text? Retell it at length.",
    "Describe the people of the story and what they want.",
    "Write a poem about the sea, then explain it.",
    "List ten things to pack for a long journey and say why.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: the embedded default)")
    parser.add_argument("--concurrency", default="1,4,8,16", help="concurrent streams per level")
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every answer")
    parser.add_argument("--min-requests", type=int, default=4, help="answers per level, at least")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each level per mode, the modes alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server (OMP_NUM_THREADS)")
    parser.add_argument("--batch", type=int, default=16, help="--max-batch of the batched server")
    parser.add_argument("--document", type=Path, default=ROOT / "benchmarks/data/dev/complete-angler.txt")
    parser.add_argument("--document-chars", type=int, default=6000, help="characters of --document uploaded")
    parser.add_argument("--out", type=Path, default=HERE / "serving.json")
    parser.add_argument("--modes", default="batched,off", help="which servers to run: batched, off")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    if not args.document.is_file():
        parser.error(f"--document {args.document} does not exist; pass a text file")
    text = args.document.read_text(encoding="utf-8")[: args.document_chars]
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"this project's shared {os.cpu_count()}-core CPU ({platform.machine()}), other jobs running",
        "model": args.model or "default (SmolLM2-135M-Instruct + shipped adapter)",
        "max_tokens": args.max_tokens,
        "min_requests": args.min_requests,
        "server_threads": args.threads,
        "document_chars": len(text),
        "modes": {},
    }
    modes = args.modes.split(",")
    servers = {
        mode: _server(args.model, args.batch if mode == "batched" else 1, max(levels), args.threads) for mode in modes
    }
    try:
        urls = {mode: server.__enter__() for mode, server in servers.items()}  # idle servers take no CPU
        docs = {mode: _upload(url, text) for mode, url in urls.items()}
        for mode in modes:
            _run_level(urls[mode], docs[mode], 1, args.max_tokens, 1)  # warm-up
            record["modes"][mode] = {"max_batch": servers[mode].batch, "levels": []}
        for level in levels:  # the modes alternate (A B B A ...) so both see the same load
            runs: dict[str, list[dict]] = {mode: [] for mode in modes}
            for repeat in range(args.repeats):
                for mode in modes if repeat % 2 == 0 else modes[::-1]:
                    runs[mode].append(
                        _run_level(urls[mode], docs[mode], level, args.max_tokens, max(level, args.min_requests))
                    )
            for mode in modes:
                result = _merge(runs[mode])
                print(f"{mode} c={level}: {json.dumps(result)}", flush=True)
                record["modes"][mode]["levels"].append(result)
    finally:
        for server in servers.values():
            server.__exit__()
    _ratios(record)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    _plot(record, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _server:
    """`nugget2d serve` in a subprocess with ``--max-batch batch``; yields its URL once healthy."""

    def __init__(self, model: str | None, batch: int, slots: int, threads: int) -> None:
        self.model, self.batch, self.slots, self.threads = model, batch, slots, threads

    def __enter__(self) -> str:
        exe = shutil.which("nugget2d", path=os.path.dirname(sys.executable)) or "nugget2d"
        self.tmp = tempfile.TemporaryDirectory()
        port = _free_port()
        command = [
            exe, "serve", "--port", str(port), "--documents-dir", str(Path(self.tmp.name) / "docs"),
            "--slots", str(self.slots), "--max-batch", str(self.batch), "--api-key", KEY, "--log-level", "warning",
        ]  # fmt: skip
        if self.model:
            command += ["--model", self.model]
        self.log = open(Path(self.tmp.name) / "server.log", "w")
        environment = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=environment)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start:\n{(Path(self.tmp.name) / 'server.log').read_text()}")
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
        self.tmp.cleanup()


def _upload(url: str, text: str) -> str:
    response = httpx.post(
        url + "/v1/documents", json={"text": text}, headers={"Authorization": f"Bearer {KEY}"}, timeout=1800
    )
    response.raise_for_status()
    return response.json()["id"]


def _one(url: str, doc_id: str, index: int, max_tokens: int) -> dict:
    """One streamed chat answer: every even worker asks over the document."""
    api = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=3600)
    extra = {"extra_body": {"documents": [doc_id]}} if index % 2 == 0 else {}
    messages = [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}]
    sent = time.perf_counter()
    first = None
    tokens = 0
    chunks = api.chat.completions.create(
        model="nugget2d", messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, **extra,
    )  # fmt: skip
    for chunk in chunks:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    done = time.perf_counter()
    return {"sent": sent, "first": first or done, "done": done, "tokens": tokens}


def _run_level(url: str, doc_id: str, level: int, max_tokens: int, requests: int) -> dict:
    """``requests`` answers taken in turn by ``level`` concurrent workers: each answer's times and tokens."""
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(level) as pool:
        answers = list(pool.map(lambda index: _one(url, doc_id, index, max_tokens), range(requests)))
    return {"level": level, "answers": answers, "wall": time.perf_counter() - started, "load": load}


def _merge(runs: list[dict]) -> dict:
    """One level's figures over its runs. Completion tokens/s: every token over the runs' wall time (prefill
    included); decode tokens/s: the tokens after each answer's first over the time from a run's first
    first token to its last answer's end."""
    answers = [a for run in runs for a in run["answers"]]
    latencies = sorted(a["done"] - a["sent"] for a in answers)
    tokens = sum(a["tokens"] for a in answers)
    wall = sum(run["wall"] for run in runs)
    decode_span = sum(max(a["done"] for a in run["answers"]) - min(a["first"] for a in run["answers"]) for run in runs)
    return {
        "concurrency": runs[0]["level"],
        "runs": len(runs),
        "requests": len(answers),
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 3),
        "decode_tokens_per_s": round(sum(a["tokens"] - 1 for a in answers if a["tokens"]) / decode_span, 3),
        "latency_p50_s": round(_quantile(latencies, 0.5), 3),
        "latency_p95_s": round(_quantile(latencies, 0.95), 3),
        "first_token_p50_s": round(statistics.median(a["first"] - a["sent"] for a in answers), 3),
        "load_average_1min": [round(run["load"], 2) for run in runs],
    }


def _quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of sorted ``values`` (linear interpolation, as numpy's default)."""
    position = (len(values) - 1) * q
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def _ratios(record: dict) -> None:
    """Per mode, each level's tokens/s over one stream's (completion and decode); batched over off per level."""
    modes = record["modes"]
    for mode in modes.values():
        one = next((lv for lv in mode["levels"] if lv["concurrency"] == 1), None)
        for level in mode["levels"]:
            for key in ("tokens_per_s", "decode_tokens_per_s"):
                ratio = key.replace("tokens_per_s", "over_one_stream")
                level[ratio] = round(level[key] / one[key], 3) if one else None
    if "batched" in modes and "off" in modes:
        off = {lv["concurrency"]: lv for lv in modes["off"]["levels"]}
        record["batched_over_off"] = {
            str(lv["concurrency"]): {
                key: round(lv[key] / off[lv["concurrency"]][key], 3) for key in ("tokens_per_s", "decode_tokens_per_s")
            }
            for lv in modes["batched"]["levels"]
            if lv["concurrency"] in off
        }


def _plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, mode in record["modes"].items():
        label = f"{name} (--max-batch {mode['max_batch']})"
        levels = [lv["concurrency"] for lv in mode["levels"]]
        left.plot(levels, [lv["tokens_per_s"] for lv in mode["levels"]], marker="o", label=f"{label} completion")
        left.plot(
            levels, [lv["decode_tokens_per_s"] for lv in mode["levels"]], marker=".", ls="--", label=f"{label} decode"
        )
        right.plot(levels, [lv["latency_p95_s"] for lv in mode["levels"]], marker="o", label=f"{label} p95")
        right.plot(levels, [lv["latency_p50_s"] for lv in mode["levels"]], marker=".", ls="--", label=f"{label} p50")
    left.set(xlabel="concurrent streams", ylabel="aggregate tokens / s", xscale="log", xticks=levels)
    right.set(xlabel="concurrent streams", ylabel="request latency (s)", xscale="log", xticks=levels)
    for axis in (left, right):
        axis.set_xticklabels([str(x) for x in levels])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"nugget2d serve, {record['model']}, max_tokens {record['max_tokens']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
