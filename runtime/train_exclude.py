"""Text that training must never read (``nugget2d train --exclude``), such as the texts a model is
evaluated on: a segment or a JSONL document that shares a run of :data:`RUN` tokens with them is left
out. Hand-rolled because it is a set of token n-gram hashes, not a library's job."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .texts import data_files, read_text_file

#: Tokens in a run that marks a segment as excluded text: long enough that ordinary phrases never match.
RUN = 16


@dataclass(frozen=True)
class ExcludedText:
    """The :data:`RUN`-token runs of the excluded files (``paths``: their names, for messages)."""

    runs: frozenset[int] = field(default_factory=frozenset)
    paths: tuple[str, ...] = ()

    @classmethod
    def from_paths(cls, paths: Iterable[str | Path], tokenizer) -> ExcludedText:
        """Read the ``.txt`` files named or found under directories; ``ValueError`` for a missing path
        or when none is found (an exclusion that reads nothing would silently exclude nothing)."""
        paths = list(paths)
        check_exclude_paths(paths)
        try:
            files = data_files(paths, (".txt",))
        except ValueError as err:
            raise ValueError(f"--exclude: {err}") from None
        runs: set[int] = set()
        for path in files:
            ids = tokenizer(read_text_file(path), add_special_tokens=False, verbose=False).input_ids
            runs.update(token_runs(ids))
        return cls(frozenset(runs), tuple(str(p) for p in files))

    def overlaps(self, ids: Sequence[int]) -> bool:
        """Whether ``ids`` hold a run of :data:`RUN` tokens found in the excluded text."""
        return not self.runs.isdisjoint(token_runs(ids))


def check_exclude_paths(paths: Iterable[str | Path]) -> None:
    """``ValueError`` naming the ``--exclude`` paths that do not exist (checked before a model loads)."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise ValueError(f"--exclude: {missing} not found; give the text files or directories to keep out")


def token_runs(ids: Sequence[int]) -> Iterable[int]:
    """The hash of every run of :data:`RUN` consecutive tokens of ``ids``, in order."""
    return (hash(tuple(ids[i : i + RUN])) for i in range(len(ids) - RUN + 1))
