"""OpenAI's response objects: completions, chat completions and their stream chunks."""

from __future__ import annotations

import json
import time
import uuid

from .jobs import Finished


def new_id(prefix: str) -> str:
    """A fresh response id such as ``chatcmpl-...``."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(finished: list[Finished]) -> dict:
    """The ``usage`` object of finished answers (summed over a request's choices)."""
    prompt = sum(f.prompt_tokens for f in finished)
    completion = sum(f.completion_tokens for f in finished)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(chat: bool, response_id: str, model: str, choices: list[tuple[str, Finished]]) -> dict:
    """The whole (non-streamed) response: one choice per ``(text, finished)``, in order."""
    out = []
    for index, (text, finished) in enumerate(choices):
        if chat:
            choice = {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": finished.logprobs}
        else:
            choice = {"index": index, "text": text, "logprobs": finished.logprobs}
        out.append({**choice, "finish_reason": finished.finish_reason})
    return {
        "id": response_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": out,
        "usage": usage([finished for _, finished in choices]),
    }


def chunk(
    chat: bool,
    response_id: str,
    model: str,
    index: int = 0,
    text: str | None = None,
    finished: Finished | None = None,
    role: bool = False,
    usage: list[Finished] | None = None,
    usage_only: bool = False,
) -> str:
    """One server-sent event carrying a stream chunk of choice ``index``: its ``text``, or its end
    (``finished``); ``usage`` (of all choices) rides on the last one, or alone with ``usage_only``."""
    data: dict = {
        "id": response_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
    }
    if usage_only:
        data.update(choices=[], usage=_usage(usage or []))
        return event(data)
    if chat:
        delta: dict = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None}
    choice["finish_reason"] = finished.finish_reason if finished else None
    data["choices"] = [choice]
    if usage is not None:
        data["usage"] = _usage(usage)
    return event(data)


_usage = usage  # ``chunk`` names its parameter ``usage``


def event(data: dict | str) -> str:
    """``data: ...`` framed as one server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
