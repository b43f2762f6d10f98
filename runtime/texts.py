"""Texts shipped with the package (public domain) and reading user text safely."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BUNDLED_BOOK = "complete-angler.txt"


def bundled_text(name: str = BUNDLED_BOOK) -> str:
    """A public-domain text shipped inside the package (Izaak Walton, *The Compleat Angler*, 1653)."""
    return resources.files("nugget2d.runtime").joinpath("data", name).read_text(encoding="utf-8")


def read_text_file(path: str | Path) -> str:
    """UTF-8 text of ``path``; ``ValueError`` for a missing, empty or binary file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"input file {path} does not exist")
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise ValueError(f"input file {path} looks binary (it contains NUL bytes); give a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"input file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not text.strip():
        raise ValueError(f"input file {path} is empty")
    return text
