"""Generated blocks inside hand-written Markdown: the text between two marker lines, replaced whole."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def replace_marked(text: str, begin: str, end: str, body: str) -> str:
    """``text`` with everything between the markers ``begin`` and ``end`` replaced by ``body`` (the
    markers stay, each followed or preceded by a newline); ``ValueError`` naming them when either is
    missing or they are out of order."""
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"the file lacks the markers {begin!r} ... {end!r} (in that order)")
    return text[: start + len(begin)] + "\n" + body.strip("\n") + "\n" + text[stop:]


def regenerate(path: Path, render: Callable[[str], str], check: bool, command: str) -> int:
    """Write ``render(text of path)`` to ``path`` and return 0; with ``check``, write nothing and return 1
    (saying to run ``command``) when the file differs from what its records give."""
    current = path.read_text()
    wanted = render(current)
    if not check:
        path.write_text(wanted)
        return 0
    if wanted != current:
        print(f"{path.name}'s generated block differs from the records: run {command}")
        return 1
    return 0
