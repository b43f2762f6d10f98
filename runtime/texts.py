"""Texts: the book shipped with the package, and reading user text (files, strings, chunk
iterators) into token chunks without loading a whole file at once."""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

BUNDLED_BOOK = "complete-angler.txt"
_READ_BYTES = 1 << 16


def bundled_text(name: str = BUNDLED_BOOK) -> str:
    """A public-domain text shipped inside the package (Izaak Walton, *The Compleat Angler*, 1653)."""
    return resources.files("nugget2d.runtime").joinpath("data", name).read_text(encoding="utf-8")


def data_files(paths: Iterable[str | Path], suffixes: tuple[str, ...]) -> list[Path]:
    """The files named, or found under directories, with one of ``suffixes``; ``ValueError`` for a
    missing path or when nothing is found."""
    paths = list(paths)
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes))
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"training data path {path} does not exist")
    if not found:
        raise ValueError(f"no {'/'.join(suffixes)} files found in {[str(p) for p in paths]}")
    return found


def check_text_file(path: str | Path) -> Path:
    """Raise ``ValueError`` for a missing, empty or binary file; checks only the first bytes."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"input file {path} does not exist")
    with path.open("rb") as handle:
        head = handle.read(_READ_BYTES)
    if not head.strip():
        raise ValueError(f"input file {path} is empty")
    if b"\x00" in head:
        raise ValueError(f"input file {path} looks binary (it contains NUL bytes); give a UTF-8 text file")
    return path


def file_chunks(path: str | Path) -> Iterator[str]:
    """The text of a UTF-8 file in pieces; ``ValueError`` naming the byte offset of bad UTF-8."""
    path = check_text_file(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as handle:
        while True:
            data = handle.read(_READ_BYTES)
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"input file {path} is not UTF-8 text ({err.reason} at byte {offset + err.start})"
                ) from err
            offset += len(data)
            if text:
                yield text
            if not data:
                return


def read_text_file(path: str | Path) -> str:
    """The whole UTF-8 text of ``path`` (same checks as :func:`file_chunks`)."""
    return "".join(file_chunks(path))


def token_chunks(tokenizer, chunks: Iterable[str]) -> Iterator[list[int]]:
    """Token ids of a text arriving in pieces, cut only before whitespace so that words split
    across pieces are tokenised whole (the ids match tokenising the text in one go, up to
    merges across whitespace)."""
    carry = ""
    for chunk in chunks:
        carry += chunk
        cut = max(carry.rfind(" "), carry.rfind("\n"))
        if cut <= 0:
            continue
        head, carry = carry[:cut], carry[cut:]
        yield tokenizer(head, add_special_tokens=False, verbose=False).input_ids
    if carry:
        yield tokenizer(carry, add_special_tokens=False, verbose=False).input_ids
