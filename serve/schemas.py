"""Request bodies of the OpenAI endpoints, as pydantic models (unknown fields are ignored).

nugget2d's own fields ride along as extra body fields: ``documents`` (ids from
``POST /v1/documents`` whose nugget caches the request reads), ``top_k``,
``repetition_penalty`` and ``lookback`` (tokens of the text read raw again before answering, at most
the server's ``--max-lookback``). Every number is bounded here, so a value the model cannot take is a 422
naming its field (floats must be finite: JSON's ``Infinity``/``NaN`` are refused).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

LOGPROBS_MAX = 20  # alternatives per position a request may ask for (logprobs, top_logprobs), as vLLM allows
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a signed 64-bit integer, as OpenAI documents seed
TOP_K_MAX = 2**20  # beyond any vocabulary: a larger top_k samples from them all, like 0
REPETITION_PENALTY_MAX = 10.0  # 1 is off; transformers divides positive logits by it


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The message as plain text; ``ValueError`` for non-text parts (images, audio)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        kinds = {part.type for part in self.content} - {"text"}
        if kinds:
            raise ValueError(f"only text content is supported, got {', '.join(sorted(kinds))} parts")
        return "".join(part.text or "" for part in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=TOP_K_MAX)
    repetition_penalty: float = Field(1.0, gt=0, le=REPETITION_PENALTY_MAX)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    documents: list[str] = Field(default_factory=list)
    lookback: int | None = Field(None, ge=0)  # tokens read back before answering (server default if unset)

    def stops(self) -> tuple[str, ...]:
        """The stop strings as a tuple (OpenAI accepts one string or a list of up to 4)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=LOGPROBS_MAX)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: a prompt (a string or token ids) or several (a list of either), one
    choice each. ``max_tokens`` may be 0 with ``echo`` (the prompt scored, nothing generated)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)
    logprobs: int | None = Field(None, ge=0, le=LOGPROBS_MAX)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


class DocumentRequest(_Body):
    """``POST /v1/documents`` as JSON (a file upload is the multipart alternative)."""

    text: str
    name: str | None = None
