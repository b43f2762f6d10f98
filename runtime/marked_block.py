"""Generated blocks inside hand-written Markdown: the text between two marker lines, replaced whole."""

from __future__ import annotations


def replace_marked(text: str, begin: str, end: str, body: str) -> str:
    """``text`` with everything between the markers ``begin`` and ``end`` replaced by ``body`` (the
    markers stay, each followed or preceded by a newline); ``ValueError`` naming them when either is
    missing or they are out of order."""
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"the file lacks the markers {begin!r} ... {end!r} (in that order)")
    return text[: start + len(begin)] + "\n" + body.strip("\n") + "\n" + text[stop:]
