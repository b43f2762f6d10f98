"""The model work behind each endpoint, as generators the engine runs in its worker thread.

Each yields ``None`` between units of work (one segment compressed) so other requests take
turns, text pieces while answering, and a final result object. What the client got wrong is
raised as :class:`~.errors.APIError`; anything else they raise is a server fault.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from nugget2d.runtime.batched_decode import DecodeBatcher
from nugget2d.runtime.generation import GenerationSettings, Scoring, TextDeltas, TokenScore
from nugget2d.runtime.session import StreamingSession
from nugget2d.runtime.texts import token_chunks

from .config import ServerConfig
from .documents import DocumentDamaged, DocumentInfo, DocumentStore
from .errors import APIError, ServerFault
from .logprobs import chat_logprobs, completion_logprobs, token_pieces
from .metrics import Metrics
from .prompts import chat_text, prompt_ids

_PIECE_CHARS = 1 << 14


@dataclass
class Context:
    """What the jobs share: the model, its tokenizer, the documents, the settings, the metrics."""

    model: object
    tokenizer: object
    store: DocumentStore
    config: ServerConfig
    metrics: Metrics
    #: runs the decode passes of all answers together (None: each answer decodes alone)
    batcher: DecodeBatcher | None = None


@dataclass
class Ask:
    """One completion to produce: chat ``messages`` or a completion ``prompt``, over ``document``;
    ``echo`` puts the prompt before the answer, ``logprobs`` (alternatives per token; ``None``: off)
    asks for log-probabilities."""

    settings: GenerationSettings
    messages: list[dict[str, str]] | None = None
    prompt: str | list[int] | None = None
    document: str | None = None
    echo: bool = False
    logprobs: int | None = None
    lookback: int | None = None  # tokens read back before answering (None: the server's default)


@dataclass
class Finished:
    """How an answer ended, with its token counts."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    compressed_tokens: int = 0
    extra: dict = field(default_factory=dict)
    logprobs: dict | None = None  # the choice's OpenAI ``logprobs`` object, when asked for


def compress_document(ctx: Context, text: str, name: str | None) -> Iterator[DocumentInfo | None]:
    """Read ``text`` into a new document session segment by segment, store it, yield its info."""
    if not text.strip():
        raise APIError(400, "the document is empty", code="empty_document")
    started = time.perf_counter()
    session = StreamingSession(ctx.model, ctx.tokenizer, ctx.config.stream, chat=True)
    for ids in token_chunks(ctx.tokenizer, _pieces(text)):
        for chunk in _segments(ids, ctx.config.stream.segment):
            session.ingest_ids(chunk, final=False)
            yield None
    session.ingest_ids([], final=True)
    if session.stats.tokens_ingested == 0:
        raise APIError(400, "the document is empty (it has no tokens)", code="empty_document")
    _count_compression(ctx.metrics, session, started, 0)
    yield ctx.store.add(session, name)


@dataclass
class _Plan:
    """How one prompt is answered: ``context`` ids read into nuggets first, then ``ids`` fed raw."""

    session: StreamingSession
    context: list[int]
    ids: list[int]
    lookback: int = 0


def answers(ctx: Context, asks: list[Ask]) -> Iterator[str | Finished | None]:
    """Answer each ask in turn, each in its own session: its text pieces, then its :class:`Finished`.
    Every ask is checked before the first is answered, so a bad one fails the request at once."""
    plans = [_plan(ctx, ask) for ask in asks]
    for ask, plan in zip(asks, plans):
        yield from _answer(ctx, ask, plan)


def _plan(ctx: Context, ask: Ask) -> _Plan:
    """The session and the tokens of ``ask``; ``APIError`` for what cannot be answered."""
    tokenizer, config = ctx.tokenizer, ctx.config
    context: list[int] = []
    if ask.document is not None:
        try:
            base = ctx.store.session(ask.document, ctx.model, tokenizer)
        except KeyError:
            raise APIError(
                404, f"no document with id {ask.document!r}", param="documents", code="document_not_found"
            ) from None
        except DocumentDamaged as err:
            what = f"the stored document {ask.document} cannot be read; delete it and upload it again"
            raise ServerFault(what, code="document_damaged") from err
        session = base.fork()
        session.answer_with(config.stream)  # the server's look-back, not the one of the upload
        if ask.messages is not None:
            ids = prompt_ids(tokenizer, chat_text(tokenizer, ask.messages, base.format.document_prefix), False, True)
        else:
            ids = _completion_ids(tokenizer, ask.prompt, starts_stream=False)
    else:
        session = StreamingSession(ctx.model, tokenizer, config.stream, chat=False)
        if ask.messages is not None:
            templated = bool(getattr(tokenizer, "chat_template", None))
            ids = prompt_ids(tokenizer, chat_text(tokenizer, ask.messages), True, templated)
        else:
            ids = _completion_ids(tokenizer, ask.prompt, starts_stream=True)
        if len(ids) > config.compress_threshold:  # long inline context: all but the last tokens become nuggets
            context, ids = ids[: -config.compress_threshold], ids[-config.compress_threshold :]
    if not ids:
        raise APIError(400, "the prompt is empty", param="prompt")
    try:
        session._check_fits(len(session.pending) + len(ids), ask.settings)
    except ValueError as err:  # the prompt and max_tokens do not fit the cache budget
        raise APIError(400, str(err), param="max_tokens") from None
    return _Plan(session, context, ids, _lookback(ctx, ask, session))


def _lookback(ctx: Context, ask: Ask, session: StreamingSession) -> int:
    """The look-back of ``ask`` (the server's default when unset); ``APIError`` 400 above the server's cap
    or for a document stored before documents kept their token ids."""
    tokens = ctx.config.stream.lookback if ask.lookback is None else ask.lookback
    if tokens > ctx.config.max_lookback:
        raise APIError(
            400,
            f"lookback {tokens} exceeds this server's limit of {ctx.config.max_lookback} tokens (--max-lookback)",
            param="lookback",
        )
    if tokens and session.token_ids is None:
        raise APIError(
            400,
            f"the document {ask.document} was stored before documents kept their token ids, which look-back "
            "needs; upload it again or ask with lookback 0",
            param="lookback",
        )
    return tokens


def _answer(ctx: Context, ask: Ask, plan: _Plan) -> Iterator[str | Finished | None]:
    session, context, config = plan.session, plan.context, ctx.config
    if context:
        started, before = time.perf_counter(), session.stats.encoder_calls
        for chunk in _segments(context, config.stream.segment):
            session.ingest_formatted(chunk, final=False)
            yield None
        session.ingest_formatted([], final=True)
        _count_compression(ctx.metrics, session, started, before)
    yield from _generate(ctx, ask, plan)


def _generate(ctx: Context, ask: Ask, plan: _Plan) -> Iterator[str | Finished | None]:
    """Generate after the plan's raw ids; with ``echo`` the prompt's text comes first, and with
    ``logprobs`` the :class:`Finished` carries the choice's log-probabilities."""
    session, ids, settings = plan.session, plan.ids, ask.settings
    compressed = len(plan.context)
    scoring = Scoring(top=ask.logprobs, prompt=ask.echo) if ask.logprobs is not None else None
    echoed = plan.context + ids if ask.echo else []
    shown = "".join(token_pieces(ctx.tokenizer, echoed))
    if shown:
        yield shown
    deltas = TextDeltas(ctx.tokenizer, settings.stop)
    tokens = session.ask_ids(ids, settings, scoring, lookback=plan.lookback, batcher=ctx.batcher)
    count = 0
    ctx.metrics.prompt_tokens.inc(len(ids) + compressed)
    try:
        for token in tokens:
            if token is None:  # its next pass is queued in the batcher: the turn ends here
                yield None
                continue
            count += 1
            piece = deltas.push(token)
            if piece:
                yield piece
            if deltas.stopped:
                break
        else:
            tail = deltas.flush()
            if tail:
                yield tail
    finally:
        tokens.close()
        ctx.metrics.completion_tokens.inc(count)
    reason = "length" if count >= settings.max_new_tokens and not deltas.stopped else "stop"
    finished = Finished(reason, len(ids) + compressed, count, compressed, {"cache_tokens": session.stats.cache_tokens})
    if scoring is not None:
        cut = len(shown) + len(deltas.text) if deltas.stopped else None
        finished.logprobs = _logprobs(ctx, ask, scoring, echoed, len(ids), count, cut)
    yield finished


def _logprobs(
    ctx: Context, ask: Ask, scoring: Scoring, echoed: list[int], fed: int, generated: int, cut: int | None
) -> dict:
    """The choice's ``logprobs`` object. A completion lists the ``echoed`` prompt's tokens (those read into
    nuggets, and the first of the ``fed`` raw ones, are not scored: ``None``) and every new token, the end
    token too when the model chose it (so a prompt and ``max_tokens: 1`` always give one more position);
    a chat lists the ``generated`` tokens only. ``cut``: where a stop string cut the text."""
    if ask.messages is not None:
        shown = scoring.scores[:generated]
        return chat_logprobs(ctx.tokenizer, [score.token for score in shown], shown, cut)
    scored = scoring.prompt_scores[len(scoring.prompt_scores) - (fed - 1) :] if echoed else []
    unscored: list[TokenScore | None] = [None] * (len(echoed) - len(scored))
    new = [score.token for score in scoring.scores]
    return completion_logprobs(ctx.tokenizer, echoed + new, [*unscored, *scored, *scoring.scores], cut)


def _completion_ids(tokenizer, prompt: str | list[int] | None, starts_stream: bool) -> list[int]:
    if isinstance(prompt, list):
        vocab = len(tokenizer)
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt token ids must be in [0, {vocab}), got {bad[:5]}", param="prompt")
        return list(prompt)
    return prompt_ids(tokenizer, prompt or "", starts_stream, templated=False)


def _count_compression(metrics: Metrics, session: StreamingSession, started: float, encoder_calls_before: int) -> None:
    metrics.compression_seconds.observe(time.perf_counter() - started)
    metrics.encoder_calls.inc(session.stats.encoder_calls - encoder_calls_before)
    metrics.compressed_tokens.inc(session.stats.tokens_ingested)


def _pieces(text: str) -> Iterator[str]:
    for begin in range(0, len(text), _PIECE_CHARS):
        yield text[begin : begin + _PIECE_CHARS]


def _segments(ids: list[int], size: int) -> Iterator[list[int]]:
    for begin in range(0, len(ids), size):
        yield ids[begin : begin + size]
