"""Ray Data's side of reading a batch job's input: the lines the driver found still to do."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pyarrow
from ray.data.datasource import FileBasedDatasource

from .batch_io import jsonl_lines, line_digest


class PendingLines(FileBasedDatasource):
    """Rows ``{text}`` of the input lines still to do, read with :func:`jsonl_lines` (the
    reader the driver checked them with), so both sides agree on every line. A line that is no
    longer what the driver read (the file changed meanwhile) is left out; the driver reports it."""

    def __init__(self, path: str, wanted: dict[int, str]) -> None:
        super().__init__(path)
        self.wanted = wanted  # line number -> the line's digest when the driver read it

    def _read_stream(self, f: pyarrow.NativeFile, path: str) -> Iterator[pyarrow.Table]:
        texts = [
            raw.decode("utf-8")
            for number, raw in jsonl_lines(io.BytesIO(f.readall()))
            if number in self.wanted and line_digest(raw) == self.wanted[number]
        ]
        yield pyarrow.table({"text": pyarrow.array(texts, pyarrow.string())})
