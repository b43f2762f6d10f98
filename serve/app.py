"""The FastAPI app: OpenAI's endpoints, documents, health and metrics (docs/design.md).

Request handlers only check and translate; all model work is a job on the :class:`Engine`'s
worker thread, so the event loop stays free while the model runs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from nugget2d.runtime.batched_decode import DecodeBatcher

from . import wire
from .config import ServerConfig
from .documents import DocumentStore
from .engine import Engine, Job
from .errors import APIError, ServerFault, install_handlers, server_fault
from .jobs import Ask, Context, Finished, answers, compress_document
from .metrics import CONTENT_TYPE, Metrics
from .middleware import BodyLimit, CountRequests, RequestIds, RequireKey
from .parsing import completion_prompts, document_text, generation_settings, parse_body
from .schemas import ChatCompletionRequest, CompletionRequest

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def create_app(config: ServerConfig, loaded: tuple | None = None) -> FastAPI:
    """The server app; it loads the model at start-up unless ``loaded`` = ``(model, tokenizer)``."""
    metrics = Metrics()
    engine = Engine(config.slots, config.max_queue, config.timeout_s, metrics)
    holder: dict[str, Context] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model, tokenizer = loaded if loaded is not None else await asyncio.to_thread(load_model, config)
        store = DocumentStore(
            config.documents_dir,
            config.document_memory_bytes,
            _document_gauges(metrics),
            max_documents=config.max_documents,
            quota_bytes=config.documents_quota_bytes,
        )
        if config.max_batch > 1:
            engine.batcher = DecodeBatcher(model, config.max_batch, on_pass=metrics.decode_batch_rows.observe)
        holder["ctx"] = Context(model, tokenizer, store, config, metrics, engine.batcher)
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="nugget2d", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine  # `nugget2d serve` drains it when told to stop
    # the last added runs first: count everything, id it, check the key, then read the body
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(RequireKey, api_key=config.api_key, metrics_key=config.metrics_key)
    app.add_middleware(RequestIds)
    app.add_middleware(CountRequests, metrics=metrics)
    install_handlers(app)

    def ctx() -> Context:
        if "ctx" not in holder or not engine.alive:
            raise APIError(503, "the server is starting or stopping", code="unavailable")
        return holder["ctx"]

    def check_model(name: str) -> None:
        if name != config.served_model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {config.served_model_name!r}",
                param="model",
                code="model_not_found",
            )

    @app.get("/health")
    async def health(request: Request) -> dict:
        """Liveness for anyone; the details for those who may read ``/metrics``."""
        context = ctx()
        if not request.state.operator:
            return {"status": "ok"}
        return {
            "status": "ok",
            "model": config.served_model_name,
            "pid": os.getpid(),
            "active": len(engine.active),
            "waiting": len(engine.waiting),
            "documents_in_memory": len(context.store.memory),
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(config)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        check_model(name)
        return _model_card(config)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await parse_body(request, ChatCompletionRequest)
        check_model(body.model)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from err
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        _refuse_streamed_logprobs(body, body.logprobs)
        limit = body.max_completion_tokens or body.max_tokens or config.max_tokens_cap
        settings = generation_settings(body, limit, config)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        document = _document(body, ctx())
        ask = Ask(settings, messages=messages, document=document, logprobs=logprobs, lookback=body.lookback)
        return await _respond(request, body, [ask], chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await parse_body(request, CompletionRequest)
        check_model(body.model)
        prompts = completion_prompts(body.prompt)
        if body.suffix:
            raise APIError(400, "suffix (insertion) is not supported by this server; leave it out", param="suffix")
        if (body.best_of or 1) > 1:
            raise APIError(
                400,
                "best_of > 1 is not supported: this server gives one choice per prompt; leave best_of out",
                param="best_of",
            )
        if body.max_tokens == 0 and not body.echo:
            raise APIError(
                400, "max_tokens 0 generates nothing: it needs echo: true (to score the prompt)", "max_tokens"
            )
        _refuse_streamed_logprobs(body, body.logprobs is not None)
        limit = (
            min(COMPLETION_DEFAULT_MAX_TOKENS, config.max_tokens_cap) if body.max_tokens is None else body.max_tokens
        )
        settings, document = generation_settings(body, limit, config), _document(body, ctx())
        asks = [
            Ask(
                settings,
                prompt=prompt,
                document=document,
                echo=body.echo,
                logprobs=body.logprobs,
                lookback=body.lookback,
            )
            for prompt in prompts
        ]
        return await _respond(request, body, asks, chat=False)

    async def _respond(request: Request, body, asks: list[Ask], chat: bool) -> Response:
        context = ctx()
        job = engine.submit(lambda: answers(context, asks))
        response_id = wire.new_id("chatcmpl" if chat else "cmpl")
        items = job.__aiter__()
        async with _cancel_on_disconnect(request, job):
            first = await _next(items)
            if body.stream:  # from here on the streaming response notices a disconnect itself
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return StreamingResponse(
                    _events(items, first, chat, response_id, body.model, include_usage, len(asks)),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            try:
                choices: list[tuple[str, Finished]] = []
                pieces, item = [], first
                while item is not None and len(choices) < len(asks):
                    if isinstance(item, Finished):
                        choices.append(("".join(pieces), item))
                        pieces = []
                    else:
                        pieces.append(item)
                    if len(choices) < len(asks):
                        item = await _next(items)
            finally:
                await items.aclose()
        if len(choices) < len(asks):
            raise APIError(503, "the answer ended without a result", code="incomplete")
        return JSONResponse(wire.completion(chat, response_id, body.model, choices))

    @app.post("/v1/documents")
    async def upload_document(request: Request) -> JSONResponse:
        text, name = await document_text(request)
        context = ctx()
        await asyncio.to_thread(context.store.check_room)  # a full store refuses before compressing
        job = engine.submit(lambda: compress_document(context, text, name))
        async with _cancel_on_disconnect(request, job):
            info = await _result(job)
        return JSONResponse(info.to_dict(), status_code=201)

    @app.get("/v1/documents")
    async def list_documents() -> dict:
        infos = await asyncio.to_thread(ctx().store.list)
        return {"object": "list", "data": [info.to_dict() for info in infos]}

    @app.get("/v1/documents/{doc_id}")
    async def get_document(doc_id: str) -> dict:
        try:
            return ctx().store.info(doc_id).to_dict()
        except KeyError:
            raise _no_document(doc_id) from None

    @app.delete("/v1/documents/{doc_id}")
    async def delete_document(doc_id: str) -> dict:
        try:
            info = await asyncio.to_thread(ctx().store.delete, doc_id)
        except KeyError:
            raise _no_document(doc_id) from None
        return {"id": info.id, "object": "document.deleted", "deleted": True}

    return app


def load_model(config: ServerConfig) -> tuple:
    """``(model, tokenizer)`` as the config names them; ``ValueError`` if the cache budget would
    take positions past the model's native window."""
    from nugget2d.runtime.loading import load_nugget2d

    shape = config.stream
    model, tokenizer = load_nugget2d(config.model, config.adapter, attention=config.attention, ratio=shape.ratio)
    window = int(model.base.config.max_position_embeddings)
    if shape.budget > window:
        raise ValueError(f"--budget ({shape.budget}) exceeds the model's native window ({window}); lower it")
    return model, tokenizer


def _document_gauges(metrics: Metrics):
    def report(count: int, nbytes: int) -> None:
        metrics.documents_in_memory.set(count)
        metrics.document_cache_bytes.set(nbytes)

    return report


def _model_card(config: ServerConfig) -> dict:
    return {"id": config.served_model_name, "object": "model", "created": 0, "owned_by": "nugget2d"}


def _document(body, context: Context) -> str | None:
    """The document a request names (at most one); 404 if it does not exist."""
    if not body.documents:
        return None
    if len(body.documents) > 1:
        raise APIError(400, "a request can name at most one document", param="documents")
    doc_id = body.documents[0]
    try:
        context.store.info(doc_id)
    except KeyError:
        raise _no_document(doc_id) from None
    return doc_id


def _refuse_streamed_logprobs(body, asked: bool) -> None:
    """400 for log-probabilities on a streamed request (they come with whole responses only)."""
    if asked and body.stream:
        raise APIError(
            400, "logprobs are not available with stream: true on this server; leave one of them out", param="logprobs"
        )


def _no_document(doc_id: str) -> APIError:
    return APIError(404, f"no document with id {doc_id!r}", param="documents", code="document_not_found")


async def _next(items):
    """The job's next item (None at its end); what the job raised other than an
    :class:`APIError` is a server fault (a 500 naming the request id only)."""
    try:
        return await items.__anext__()
    except StopAsyncIteration:
        return None
    except APIError:
        raise
    except ServerFault as err:
        raise server_fault(err, err.what, err.code) from None
    except Exception as err:
        raise server_fault(err, "the model failed on this request") from None


async def _result(job: Job):
    """The last item of ``job``, its errors turned into API errors."""
    items, last = job.__aiter__(), None
    while (item := await _next(items)) is not None:
        last = item
    return last


async def _events(
    items, first, chat: bool, response_id: str, model: str, include_usage: bool, prompts: int
) -> AsyncIterator[str]:
    """The SSE stream: a role chunk, text chunks, each prompt's final chunk (the last carries the usage of
    all), an optional usage chunk, ``[DONE]``. Several prompts are answered in turn, their chunks
    marked with their ``index``."""
    try:
        if chat:
            yield wire.chunk(chat, response_id, model, role=True)
        item, done = first, []
        while item is not None:
            if isinstance(item, Finished):
                done.append(item)
                last = len(done) == prompts
                yield wire.chunk(
                    chat, response_id, model, index=len(done) - 1, finished=item, usage=done if last else None
                )
                if last:
                    if include_usage:
                        yield wire.chunk(chat, response_id, model, usage=done, usage_only=True)
                    break
            else:
                yield wire.chunk(chat, response_id, model, index=len(done), text=item)
            item = await _next(items)
        yield wire.event("[DONE]")
    except APIError as err:
        yield wire.event(err.body())
    finally:
        await items.aclose()


@asynccontextmanager
async def _cancel_on_disconnect(request: Request, job: Job) -> AsyncIterator[None]:
    """While inside, a client that hangs up cancels ``job`` (its generation stops at the next token)."""

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.2)
        job.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
