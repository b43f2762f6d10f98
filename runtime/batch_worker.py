"""One model answering documents: the work each batch-job actor does (no Ray in here).

A document is streamed once into a bounded nugget cache (:class:`StreamingSession`); every
question is then asked of a fork of that post-reading state, so the answers are independent of
each other and of their order, and the document is never encoded twice. The questions of a document
are decoded together, ``max_batch`` of them per forward pass (:func:`~.batched_decode.ask_together`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .batch_io import Request, document_file, error_row
from .batched_decode import ask_together
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
    allow_paths_outside: bool = False  # read a document_path that leads outside base_dir
    max_batch: int = 8  # questions of one document decoded in one forward pass at most (1: in turn)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1 (1: questions in turn), got {self.max_batch}")


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
            settings.model, settings.adapter, attention=settings.attention, ratio=settings.stream.ratio
        )

    def run(self, request: Request) -> DocumentResult:
        """Rows for one request; any failure becomes an error row (retryable or final), never an exception."""
        result = DocumentResult(rows=[])
        started = time.perf_counter()
        try:
            session = StreamingSession(self.model, self.tokenizer, self.settings.stream, chat=self.settings.chat)
            source = self._source(request)
            result.compressions += 1
            session.ingest(source)
        except Exception as err:  # a failing document gives an error row, the job goes on
            result.rows.append(_error(request, err))
            return result
        result.encoder_calls = session.stats.encoder_calls
        if self.settings.task == "summarize":
            result.rows.append(self._summary(request, session, started))
        else:
            ingest_seconds = time.perf_counter() - started
            forks = [session.fork() for _ in request.questions]
            asked = time.perf_counter()
            answers = ask_together(forks, request.questions, self.settings.generation, self.settings.max_batch)
            seconds = time.perf_counter() - asked
            for question, fork, answer in zip(request.questions, forks, answers):
                row = {"id": request.id, "question": question}
                if isinstance(answer, BaseException):  # one bad question (e.g. too long for the budget) spoils its row
                    result.rows.append({**row, **_error(request, answer)})
                    continue
                row.update(
                    answer=answer.strip(),
                    cache_tokens=session.stats.cache_tokens,
                    seconds=round(seconds, 4),  # the document's questions were answered together in this time
                    ingest_seconds=round(ingest_seconds, 4),
                )
                result.rows.append(row)
                result.encoder_calls += fork.stats.encoder_calls - session.stats.encoder_calls
        return result

    def _source(self, request: Request) -> str | Path:
        if request.document is not None:
            return request.document
        path = document_file(request.document_path, self.settings.base_dir, self.settings.allow_paths_outside)
        if not path.is_file():
            raise ValueError(f"document_path {request.document_path} does not exist (looked for {path})")
        return path

    def _summary(self, request: Request, session: StreamingSession, started: float) -> dict:
        cache_tokens = session.stats.cache_tokens
        try:
            summary = "".join(session.ask(self.settings.prompt, self.settings.generation)).strip()
        except Exception as err:
            return _error(request, err)
        return {
            "id": request.id,
            "summary": summary,
            "cache_tokens": cache_tokens,
            "seconds": round(time.perf_counter() - started, 4),
        }


#: failures caused by the request itself (bad text, a missing file, a question too long): retrying
#: cannot help. Anything else (out of memory, an I/O or device error) is retried by the next run.
FINAL_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def _error(request: Request, err: Exception) -> dict:
    """The error row of a failed request: final errors as their message; others with their type,
    so they can be looked up, and marked retryable."""
    if isinstance(err, FINAL_ERRORS):
        return error_row(request.id, str(err), retryable=False)
    return error_row(request.id, f"{type(err).__name__}: {err}", retryable=True)
