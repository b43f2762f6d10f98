"""Reading request bodies: JSON into the schemas, document uploads, sampling settings."""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from nugget2d.runtime.generation import GenerationSettings

from .config import ServerConfig
from .errors import APIError
from .schemas import DocumentRequest


async def parse_body(request: Request, schema: type[BaseModel]) -> BaseModel:
    """The JSON body as ``schema``, whatever the content type: 400 if it is not JSON, 422 if it
    does not fit the schema."""
    try:
        data = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise RequestValidationError(err.errors()) from None


async def document_text(request: Request) -> tuple[str, str | None]:
    """The text of an upload: multipart ``file``, a text/plain body, or JSON ``{"text", "name"}``."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "the multipart upload needs a 'file' part", param="file")
        data, name = await upload.read(), upload.filename
    elif kind == "text/plain":
        data, name = await request.body(), None
    else:
        body = await parse_body(request, DocumentRequest)
        return body.text, body.name
    try:
        return data.decode("utf-8"), name
    except UnicodeDecodeError as err:
        raise APIError(400, f"the document is not UTF-8 text ({err.reason} at byte {err.start})", param="file") from err


def completion_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a ``/v1/completions`` request, one per choice: a string or token ids is one
    prompt, a list of strings or of token-id lists is several; 400 for an empty list."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(
            400, "the prompt is an empty list: send a string, token ids, or a list of either", param="prompt"
        )
    if isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def generation_settings(body, max_tokens: int, config: ServerConfig) -> GenerationSettings:
    """Sampling settings of a request; ``APIError`` 400 for what this server cannot do."""
    if max_tokens > config.max_tokens_cap:
        raise APIError(
            400, f"max_tokens ({max_tokens}) exceeds this server's cap of {config.max_tokens_cap}", param="max_tokens"
        )
    if body.n != 1:
        raise APIError(
            400,
            f"n = {body.n} is not supported: this server gives one choice per prompt; send the request {body.n} "
            "times (with different seeds when sampling)",
            param="n",
        )
    stops = body.stops()
    if len(stops) > 4:
        raise APIError(400, f"at most 4 stop strings, got {len(stops)}", param="stop")
    return GenerationSettings(
        max_new_tokens=max_tokens,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        repetition_penalty=body.repetition_penalty,
        seed=body.seed,
        stop=stops,
    )
