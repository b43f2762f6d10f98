"""What a session counts: tokens read and generated, time, cache and full-KV bytes, peak memory."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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

    @property
    def ingest_tokens_per_s(self) -> float:
        return self.tokens_ingested / self.ingest_seconds if self.ingest_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def to_dict(self) -> dict[str, float]:
        """All counters plus the derived rates, JSON-ready."""
        data = asdict(self)
        data.update(ingest_tokens_per_s=self.ingest_tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s)
        return data
