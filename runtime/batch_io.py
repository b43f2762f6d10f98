"""JSONL files of the batch jobs: reading and checking requests, and the resumable output file.

A request line is ``{"id": ..., "document": TEXT | "document_path": PATH, "questions": [...]}``
(``questions`` only for ``qa``). Output rows of one document are appended with a single
write + flush + fsync, so a killed job loses nothing it wrote; on the next run a torn last line is
dropped, documents whose rows are incomplete or hold a retryable error are removed and done again,
and complete ones are skipped. Lines that cannot be read become error rows carrying their ``line``
number. :func:`jsonl_lines` is the one definition of a line, for the driver and the Ray read tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

TASKS = ("qa", "summarize")


@dataclass(frozen=True)
class Request:
    """One checked input line: a document (inline or a path) and, for ``qa``, its questions."""

    id: str | int
    questions: tuple[str, ...] = ()
    document: str | None = None
    document_path: str | None = None

    @property
    def key(self) -> str:
        """The id as the output's rows are grouped by it."""
        return id_key(self.id)

    def expected_rows(self, task: str) -> int:
        """Rows a finished document has in the output (when it did not fail as a whole)."""
        return len(self.questions) if task == "qa" else 1


def id_key(value: Any) -> str:
    """Rows are grouped by ``"id:" + str(id)``: ``1`` and ``"1"`` are the same document."""
    return f"id:{value}"


def row_key(row: dict) -> str:
    """Which input a row belongs to: its unreadable ``line``, or its document ``id``."""
    return f"line:{row['line']}" if "line" in row else id_key(row.get("id"))


def error_row(ident: Any, message: str, retryable: bool, line: int | None = None) -> dict:
    """An error row: ``retryable`` failures (out of memory, an I/O error) are done again by the next
    run; final ones (the request itself is wrong) stay until the row is deleted."""
    row = {"id": ident} if line is None else {"id": ident, "line": line}
    row.update(error=message, retryable=retryable)
    return row


def jsonl_lines(handle: BinaryIO | Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """The lines of a JSONL input as bytes, numbered from 1, blank ones left out.

    A line ends at ``\\n`` only: JSON has no raw newline inside a value, while U+2028, U+2029,
    U+0085 or a lone ``\\r`` may stand raw in a valid line. The driver and Ray's read tasks both
    read through this, so they agree on every line number.
    """
    for number, raw in enumerate(handle, start=1):
        if raw.strip():
            yield number, raw


def decode_line(raw: bytes) -> str:
    """A line's text; ``ValueError`` naming the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"not UTF-8 text ({err.reason} at byte {err.start + 1} of the line); save the file as UTF-8"
        ) from None


def parse_line(raw: bytes, task: str) -> Request:
    """Check one input line as read from the file; ``ValueError`` saying what is wrong with it."""
    return parse_request(decode_line(raw), task)


def parse_request(text: str, task: str) -> Request:
    """Check one JSONL line; ``ValueError`` saying what is wrong with it."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    ident = data.get("id")
    if isinstance(ident, bool) or not isinstance(ident, (str, int)) or (isinstance(ident, str) and not ident.strip()):
        raise ValueError('"id" must be a non-empty string or an integer')
    document, path = data.get("document"), data.get("document_path")
    if (document is None) == (path is None):
        raise ValueError('give exactly one of "document" (the text) or "document_path" (a UTF-8 text file)')
    if document is not None and (not isinstance(document, str) or not document.strip()):
        raise ValueError('"document" must be a non-empty string')
    if path is not None and (not isinstance(path, str) or not path.strip()):
        raise ValueError('"document_path" must be a non-empty string')
    questions: tuple[str, ...] = ()
    if task == "qa":
        raw = data.get("questions")
        if not isinstance(raw, list) or not raw:
            raise ValueError('"questions" must be a non-empty list of strings')
        if not all(isinstance(q, str) and q.strip() for q in raw):
            raise ValueError('every entry of "questions" must be a non-empty string')
        questions = tuple(raw)
    return Request(ident, questions, document, path)


@dataclass
class InputPlan:
    """What an input file asks for: rows expected per document, and error rows for bad lines."""

    expected: dict[str, int] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)
    #: for each document, the number and :func:`line_digest` of the line asking for it
    lines: dict[str, tuple[int, str]] = field(default_factory=dict)

    def complete(self, rows: list[dict], task: str) -> bool:
        """Whether the rows written for one key are all it needs."""
        if not rows:
            return False
        key = row_key(rows[0])
        if key.startswith("line:") or key not in self.expected:
            return True  # an unreadable line's error row, or a document no longer in the input
        if any(row.get("retryable") for row in rows):
            return False  # a transient failure (out of memory, an I/O error): done again
        if len(rows) == 1 and "error" in rows[0] and "question" not in rows[0]:
            return True  # the document failed as a whole
        return len(rows) == self.expected[key]


def scan_input(path: str | Path, task: str) -> InputPlan:
    """Read the input once, without keeping documents: the rows each valid id expects, and an
    error row (with its ``line`` number) for every line that is malformed or repeats an id."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"input file {path} does not exist")
    plan = InputPlan()
    with path.open("rb") as handle:
        for number, raw in jsonl_lines(handle):
            try:
                request = parse_line(raw, task)
            except ValueError as err:
                plan.errors.append(error_row(_loose_id(raw), f"line {number}: {err}", False, line=number))
                continue
            if request.key in plan.lines:
                first = plan.lines[request.key][0]
                message = f"line {number}: id {request.id!r} already appears on line {first}; ids must be unique"
                plan.errors.append(error_row(request.id, message, False, line=number))
                continue
            plan.lines[request.key] = (number, line_digest(raw))
            plan.expected[request.key] = request.expected_rows(task)
    if not plan.expected and not plan.errors:
        raise ValueError(f"input file {path} has no lines")
    return plan


def line_digest(raw: bytes) -> str:
    """A short fingerprint of an input line as read (surrounding whitespace ignored)."""
    return hashlib.blake2b(raw.strip(), digest_size=16).hexdigest()


def _loose_id(raw: bytes) -> str | int | None:
    """The id of a line that failed the checks, when it has a usable one (for the error row)."""
    try:
        data = json.loads(raw.decode("utf-8", "replace"))
    except (json.JSONDecodeError, ValueError):
        return None
    ident = data.get("id") if isinstance(data, dict) else None
    return ident if isinstance(ident, (str, int)) and not isinstance(ident, bool) else None


class ResultFile:
    """The output JSONL, appended to one document at a time."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def prepare(self, plan: InputPlan, task: str) -> set[str]:
        """Make the file safe to append to and return the keys already complete.

        Drops a torn last line and the rows of documents that are incomplete (rewriting the file
        atomically), so redoing those documents writes every row exactly once.
        """
        if self.path.is_dir():
            raise ValueError(f"output {self.path} is a directory; give a file path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            return set()
        rows, torn = _read_rows(self.path)
        groups: dict[str, list[dict]] = {}
        for row in rows:
            groups.setdefault(row_key(row), []).append(row)
        done = {key for key, group in groups.items() if plan.complete(group, task)}
        if torn or len(done) < len(groups):
            self._rewrite(row for row in rows if row_key(row) in done)
        return done

    def append(self, rows: Iterable[dict]) -> None:
        """Append rows with one write, then flush and fsync: all of them reach the disk, or (if the
        process dies mid-write) a torn tail that :meth:`prepare` removes."""
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if not data:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    def _rewrite(self, rows: Iterable[dict]) -> None:
        handle = tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=self.path.parent, prefix=f".{self.path.name}.", delete=False
        )
        try:
            with handle:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(handle.name, self.path)
        finally:
            if os.path.exists(handle.name):
                os.unlink(handle.name)


def _read_rows(path: Path) -> tuple[list[dict], bool]:
    """The rows of an output file and whether its last line was torn; ``ValueError`` for damage
    anywhere else (the jobs never write it, so the file was edited or is not an output file)."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines[-1] != b""  # a last line with no newline was cut short
    rows = []
    body = lines[:-1]
    for number, line in enumerate(body, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or ("id" not in row and "line" not in row):
                raise ValueError("not a result row")
        except ValueError as err:
            raise ValueError(
                f"output file {path} line {number} is not a result row ({err}); move the file away or fix that line"
            ) from None
        rows.append(row)
    return rows, torn


def document_file(document_path: str, base_dir: str | Path, allow_outside: bool = False) -> Path:
    """The file a request's ``document_path`` names, resolved (``~``, ``..`` and symlinks) under
    ``base_dir``, the input file's folder; ``ValueError`` for one that leads outside it, unless
    ``allow_outside``."""
    base = Path(base_dir).resolve()
    path = (base / Path(document_path).expanduser()).resolve()
    if not allow_outside and not path.is_relative_to(base):
        raise ValueError(
            f"document_path {document_path!r} leads outside the input file's folder {base} (to {path}); "
            "move the document under that folder, or pass --allow-paths-outside to read it anyway"
        )
    return path
