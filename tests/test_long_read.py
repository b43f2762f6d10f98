"""A long read logs its cost as it goes (tokens, ms per segment, cache bytes, RSS at 10k, 20k, 50k, 100k,
... tokens), and that cost stays flat: memory bounded, segments no slower late than early."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_llama, tiny_tokenizer

from nugget2d.compress import Nugget2DConfig, Nugget2DModel
from nugget2d.runtime.session import StreamingSession, StreamSettings
from nugget2d.runtime.session_stats import next_milestone


def test_milestones_run_one_two_five_per_decade():
    assert [next_milestone(n) for n in (0, 9_999, 10_000, 19_999, 20_000, 50_000, 99_999, 100_000, 10**6)] == [
        10_000, 10_000, 20_000, 20_000, 50_000, 100_000, 100_000, 200_000, 2 * 10**6,
    ]  # fmt: skip


def _read(tokens: int, chunk: int = 1000) -> StreamingSession:
    model = Nugget2DModel.from_base(tiny_llama(), Nugget2DConfig(scorer_layer=1)).eval()
    session = StreamingSession(model, tiny_tokenizer(), StreamSettings(ratio=0.1, budget=400, recent=64, segment=128))
    ids = torch.randint(3, 90, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    for begin in range(0, tokens, chunk):  # arriving in pieces that do not line up with segments
        session.ingest_ids(ids[begin : begin + chunk], final=False)
    session.ingest_ids([], final=True)
    return session


def test_a_read_logs_a_point_at_each_milestone_it_passes(tmp_path):
    session = _read(21_000)
    log = session.stats.reading_log
    assert [point["tokens"] // 10_000 for point in log] == [1, 2]  # the first segment reaching each milestone
    assert all(0 <= point["tokens"] % 10_000 < 128 for point in log)
    for point in log:
        assert point["segment_ms"] > 0 and point["cache_bytes"] > 0
        assert point["rss_bytes"] > 0 and point["peak_rss_bytes"] > 0
    stats = json.loads(json.dumps(session.stats.to_dict()))  # what --stats-json writes
    assert stats["reading_log"] == log
    session.save(tmp_path / "s")
    loaded = StreamingSession.load(tmp_path / "s", session.model, session.tokenizer)
    assert loaded.stats.reading_log == log


@pytest.mark.slow
def test_a_hundred_thousand_tokens_read_in_flat_memory_and_time():
    log = _read(100_000).stats.reading_log
    at = {round(point["tokens"], -4): point for point in log}
    assert sorted(at) == [10_000, 20_000, 50_000, 100_000]
    sizes = [point["cache_bytes"] for point in log]
    assert max(sizes) <= sizes[0]  # the cache was full before 10k and never grows
    assert at[100_000]["rss_bytes"] - at[20_000]["rss_bytes"] < 64 * 2**20
    # mean ms per segment over 50k-100k against 10k-20k, in one process: no growth with what was read
    assert at[100_000]["segment_ms"] < 1.5 * at[20_000]["segment_ms"]
