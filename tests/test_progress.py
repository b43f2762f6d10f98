"""Reading shows its progress in tokens, segment by segment, with a known total for texts and files."""

from __future__ import annotations

import re

from tiny_models import text_file, tiny_llama, tiny_tokenizer
from tqdm.auto import tqdm

from nugget2d.compress import Nugget2DConfig, Nugget2DModel
from nugget2d.runtime import session as session_module
from nugget2d.runtime.session import StreamingSession, StreamSettings


def _session() -> StreamingSession:
    model = Nugget2DModel.from_base(tiny_llama(), Nugget2DConfig(scorer_layer=1)).eval()
    settings = StreamSettings(ratio=0.25, budget=120, recent=32, segment=32)
    return StreamingSession(model, tiny_tokenizer(), settings, chat=False, progress=True)


def _counts(err: str) -> list[tuple[int, int]]:
    """Every ``done/total`` a tqdm bar printed, in order."""
    return [(int(a), int(b)) for a, b in re.findall(r"(\d+)/(\d+) \[", err)]


class _RecordedBar(tqdm):
    """tqdm that keeps every update it was given (what it prints is throttled by time)."""

    updates: list[int] = []

    def update(self, n=1):
        _RecordedBar.updates.append(n)
        return super().update(n)


def test_the_bar_counts_tokens_per_segment_up_to_the_known_total(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(session_module, "tqdm", _RecordedBar)
    _RecordedBar.updates = []
    session = _session()
    read = session.ingest(text_file(tmp_path, words=400))
    err = capsys.readouterr().err
    assert "tok" in err and "B/s" not in err  # tokens, not bytes
    assert _counts(err)[-1] == (read, read)  # the total was known before reading, and reached
    assert sum(_RecordedBar.updates) == read
    assert _RecordedBar.updates[:-1] == [32] * (len(_RecordedBar.updates) - 1)  # one update per segment read


def test_a_string_gets_the_same_token_bar(capsys):
    session = _session()
    read = session.ingest("the old angler said that the river was good for fish . " * 20)
    assert _counts(capsys.readouterr().err)[-1] == (read, read)
