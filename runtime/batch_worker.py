"""One model answering documents: the work each batch-job actor does (no Ray in here).

A document is streamed once into a bounded nugget cache (:class:`StreamingSession`); every
question is then asked of a fork of that post-reading state, so the answers are independent of
each other and of their order, and the document is never encoded twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nugget2d.compress import Nugget2DConfig

from .batch_io import Request
from .generation import GenerationSettings
from .session import StreamingSession, StreamSettings

SUMMARY_PROMPT = "Summarize the text above in a few sentences."


@dataclass
class JobSettings:
    """Everything an actor needs to turn requests into rows."""

    task: str = "qa"
    model: str | None = None
    adapter: str | None = None
    attention: str = "sdpa"
    stream: StreamSettings = field(default_factory=StreamSettings)
    generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(max_new_tokens=64))
    chat: bool = True
    prompt: str = SUMMARY_PROMPT
    base_dir: str = "."  # relative document_path values are read from here (the input file's folder)


@dataclass
class DocumentResult:
    """The output rows of one document, and how much encoding it took."""

    rows: list[dict]
    compressions: int = 0  # times the document was streamed into a cache (1 unless it failed first)
    encoder_calls: int = 0  # encoder passes spent on it, answering included


class DocumentWorker:
    """Loads the model once and answers (``qa``) or summarises (``summarize``) documents."""

    def __init__(self, settings: JobSettings) -> None:
        from .loading import load_nugget2d

        self.settings = settings
        torch.manual_seed(0)  # without an adapter the scorer is freshly initialised: the same in every actor
        self.model, self.tokenizer = load_nugget2d(
            settings.model, settings.adapter, Nugget2DConfig(ratio=settings.stream.ratio), settings.attention
        )

    def run(self, request: Request) -> DocumentResult:
        """Rows for one request; any failure becomes an error row, never an exception."""
        result = DocumentResult(rows=[])
        started = time.perf_counter()
        try:
            session = StreamingSession(self.model, self.tokenizer, self.settings.stream, chat=self.settings.chat)
            source = self._source(request)
            result.compressions += 1
            session.ingest(source)
        except Exception as err:  # a failing document gives an error row, the job goes on
            result.rows.append({"id": request.id, "error": _describe(err)})
            return result
        result.encoder_calls = session.stats.encoder_calls
        if self.settings.task == "summarize":
            result.rows.append(self._summary(request, session, started))
        else:
            ingest_seconds = time.perf_counter() - started
            for question in request.questions:
                fork = session.fork()
                result.rows.append(self._answer(request, question, fork, session.stats.cache_tokens, ingest_seconds))
                result.encoder_calls += fork.stats.encoder_calls - session.stats.encoder_calls
        return result

    def _source(self, request: Request) -> str | Path:
        if request.document is not None:
            return request.document
        path = Path(self.settings.base_dir) / Path(request.document_path).expanduser()
        if not path.is_file():
            raise ValueError(f"document_path {request.document_path} does not exist (looked for {path})")
        return path

    def _answer(
        self, request: Request, question: str, session: StreamingSession, cache_tokens: int, ingest_seconds: float
    ) -> dict:
        started = time.perf_counter()
        row = {"id": request.id, "question": question}
        try:
            row["answer"] = "".join(session.ask(question, self.settings.generation)).strip()
        except Exception as err:  # one bad question (e.g. too long for the budget) spoils only its row
            row["error"] = _describe(err)
            return row
        row.update(
            cache_tokens=cache_tokens,
            seconds=round(time.perf_counter() - started, 4),
            ingest_seconds=round(ingest_seconds, 4),
        )
        return row

    def _summary(self, request: Request, session: StreamingSession, started: float) -> dict:
        cache_tokens = session.stats.cache_tokens
        try:
            summary = "".join(session.ask(self.settings.prompt, self.settings.generation)).strip()
        except Exception as err:
            return {"id": request.id, "error": _describe(err)}
        return {
            "id": request.id,
            "summary": summary,
            "cache_tokens": cache_tokens,
            "seconds": round(time.perf_counter() - started, 4),
        }


def _describe(err: Exception) -> str:
    """User errors as their message; anything else with its type, so it can be looked up."""
    if isinstance(err, (ValueError, FileNotFoundError)):
        return str(err)
    return f"{type(err).__name__}: {err}"
