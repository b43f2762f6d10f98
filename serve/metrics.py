"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Requests, tokens in and out, compression work and time, cache bytes, queue depth."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "nugget2d_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("nugget2d_prompt_tokens", "prompt tokens read (tokens in)", registry=r)
        self.completion_tokens = Counter("nugget2d_completion_tokens", "tokens generated (tokens out)", registry=r)
        self.encoder_calls = Counter(
            "nugget2d_encoder_calls", "segments encoded into nuggets (documents and long inline context)", registry=r
        )
        self.compressed_tokens = Counter("nugget2d_compressed_tokens", "tokens read into nugget caches", registry=r)
        self.compression_seconds = Histogram(
            "nugget2d_compression_seconds",
            "seconds spent compressing one document or inline context",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, float("inf")),
            registry=r,
        )
        self.document_cache_bytes = Gauge(
            "nugget2d_document_cache_bytes", "bytes of document nugget caches held in memory", registry=r
        )
        self.documents_in_memory = Gauge("nugget2d_documents_in_memory", "documents held in memory", registry=r)
        self.queue_depth = Gauge("nugget2d_queue_depth", "requests waiting for the model worker", registry=r)
        self.active = Gauge("nugget2d_active_generations", "requests the model worker is running now", registry=r)
        self.decode_batch_rows = Histogram(
            "nugget2d_decode_batch_rows",
            "answers decoded by one forward pass (batched decoding)",
            buckets=(1, 2, 4, 8, 16, 32, 64, float("inf")),
            registry=r,
        )

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
