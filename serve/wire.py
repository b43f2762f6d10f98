"""OpenAI's response objects: completions, chat completions and their stream chunks."""

from __future__ import annotations

import json
import time
import uuid

from .jobs import Finished


def new_id(prefix: str) -> str:
    """A fresh response id such as ``chatcmpl-...``."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(finished: Finished) -> dict:
    """The ``usage`` object of a finished answer."""
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


def completion(chat: bool, response_id: str, model: str, text: str, finished: Finished) -> dict:
    """The whole (non-streamed) response."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "logprobs": None}
    return {
        "id": response_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{**choice, "finish_reason": finished.finish_reason}],
        "usage": usage(finished),
    }


def chunk(
    chat: bool,
    response_id: str,
    model: str,
    text: str | None = None,
    finished: Finished | None = None,
    role: bool = False,
    usage_only: bool = False,
) -> str:
    """One server-sent event carrying a stream chunk (the last one carries ``finish_reason`` and ``usage``)."""
    data: dict = {
        "id": response_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
    }
    if usage_only:
        data.update(choices=[], usage=usage(finished))
        return event(data)
    if chat:
        delta: dict = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None}
    choice["finish_reason"] = finished.finish_reason if finished else None
    data["choices"] = [choice]
    if finished is not None:
        data["usage"] = usage(finished)
    return event(data)


def event(data: dict | str) -> str:
    """``data: ...`` framed as one server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
