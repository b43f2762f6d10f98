"""Shared pieces of the needle analysis: the model, RULER niah_single_1 samples at 2k as
``bench quality --metrics ruler`` generates them, where each needle sits, and the bench's cache shape.

Run with the pre-refactor package on the path (``PYTHONPATH=/work/before_pkg``): see README.md.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from nugget2d.runtime import bench_ruler
from nugget2d.runtime.bench_common import CacheShape
from nugget2d.runtime.generation import GenerationSettings
from nugget2d.runtime.loading import load_nugget2d
from nugget2d.runtime.session import StreamingSession

HERE = Path(__file__).resolve().parent
NEW_TOKENS = 32
CONTEXT = 2048
RATIO = 0.1


@dataclass
class Needle:
    """Token positions (in the context ids) of a sample's needle sentence, its key and its value digits."""

    sentence: list[int]
    key: list[int]
    value: list[int]


def load():
    """The default model with the shipped adapter, and its tokenizer."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return load_nugget2d()


def samples(tokenizer, count: int = 12, length: int = CONTEXT) -> list:
    """The first ``count`` niah_single_1 samples lm-eval generates at ``length`` (as the bench does)."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return bench_ruler.samples(tokenizer, ["niah_single_1"], [length], count)


def needle(tokenizer, sample) -> Needle:
    """Where the needle's tokens sit among the context ids of ``sample`` (cut before the question line)."""
    text = sample.context + sample.question
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    value = sample.answers[0]
    at = sample.context.find(value)
    line_start = sample.context.rfind("\n", 0, at) + 1
    line_end = sample.context.find("\n", at)
    key_text = sample.context[line_start:at].split(" for ", 1)[1].split(" is:")[0]
    key_at = sample.context.find(key_text, line_start)

    def tokens(begin: int, end: int) -> list[int]:
        return [i for i, (a, b) in enumerate(enc.offset_mapping) if b > begin and a < end and b > a]

    return Needle(tokens(line_start, line_end), tokens(key_at, key_at + len(key_text)), tokens(at, at + len(value)))


def settings(tail_len: int, ratio: float = RATIO, **overrides):
    """The bench's StreamSettings for nugget2d at ``ratio`` of RULER's 2,048 tokens, with room for the tail."""
    shape = CacheShape("nugget2d", ratio, CONTEXT, tail_len + NEW_TOKENS)
    out = shape.settings()
    if overrides:
        import dataclasses

        out = dataclasses.replace(out, **overrides)
    return out


def answer(model, tokenizer, sample, stream_settings=None) -> tuple[str, StreamingSession, float]:
    """The bench's greedy answer to ``sample`` (context read and compressed, then the question line),
    the session after it, and the seconds spent reading the context."""
    context, tail = sample.split_ids(tokenizer)
    stream_settings = stream_settings or settings(len(tail))
    session = StreamingSession(model, tokenizer, stream_settings, chat=False)
    started = time.perf_counter()
    session.ingest_formatted(context, final=True)
    read_s = time.perf_counter() - started
    out = list(session.ask_ids(tail, GenerationSettings(max_new_tokens=NEW_TOKENS)))
    return tokenizer.decode(out, skip_special_tokens=True), session, read_s


def write_json(name: str, data) -> Path:
    """Write ``data`` to ``HERE/name`` (indented) and return the path."""
    path = HERE / name
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
