"""What a session counts: tokens read and generated, time, cache and full-KV bytes, peak memory."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .resources import current_rss_bytes, peak_rss_bytes


def next_milestone(tokens: int) -> int:
    """The first token count above ``tokens`` where a long read is logged: 10k, 20k, 50k, 100k, 200k,
    500k, 1M, ... (1-2-5 in each decade)."""
    decade = 10_000
    while True:
        for step in (1, 2, 5):
            if step * decade > tokens:
                return step * decade
        decade *= 10


@dataclass
class SessionStats:
    """Counters a caller reports: sizes in tokens and bytes, rates, peak memory."""

    tokens_ingested: int = 0
    encoder_calls: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ingest_seconds: float = 0.0
    decode_seconds: float = 0.0
    cache_tokens: int = 0
    nugget_tokens: int = 0
    cache_bytes: int = 0
    full_kv_bytes: int = 0
    peak_rss_bytes: int = 0
    #: one point per milestone of :func:`next_milestone` crossed while reading: tokens read, mean ms per
    #: segment since the previous point, cache bytes, RSS now and peak RSS
    reading_log: list[dict] = field(default_factory=list)
    segment_seconds_since_log: float = 0.0
    segments_since_log: int = 0

    @property
    def ingest_tokens_per_s(self) -> float:
        return self.tokens_ingested / self.ingest_seconds if self.ingest_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def note_segment(self, tokens: int, seconds: float, cache) -> None:
        """Count one segment's reading time (after its ``tokens`` were counted); log a point when a
        milestone of :func:`next_milestone` was crossed, with ``cache``'s bytes."""
        self.segment_seconds_since_log += seconds
        self.segments_since_log += 1
        if next_milestone(self.tokens_ingested - tokens) > self.tokens_ingested:
            return
        self.reading_log.append(
            {
                "tokens": self.tokens_ingested,
                "segment_ms": 1000 * self.segment_seconds_since_log / self.segments_since_log,
                "cache_bytes": cache.nbytes,
                "rss_bytes": current_rss_bytes(),
                "peak_rss_bytes": peak_rss_bytes(),
            }
        )
        self.segment_seconds_since_log, self.segments_since_log = 0.0, 0

    def to_dict(self) -> dict[str, float]:
        """All counters plus the derived rates, JSON-ready."""
        data = asdict(self)
        data.update(ingest_tokens_per_s=self.ingest_tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s)
        return data
