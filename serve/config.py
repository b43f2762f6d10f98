"""The server's settings: model, cache shape, limits. Checked once at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nugget2d.runtime.models import cache_dir
from nugget2d.runtime.session import StreamSettings


def default_documents_dir() -> Path:
    """Where uploaded documents persist unless ``--documents-dir`` says otherwise."""
    return cache_dir() / "documents"


@dataclass
class ServerConfig:
    """Everything ``nugget2d serve`` can be told; ``ValueError`` on an impossible combination."""

    model: str | None = None
    adapter: str | None = None
    attention: str = "sdpa"
    served_model_name: str = "nugget2d"
    api_key: str | None = None  # required on every path but /health (liveness)
    metrics_key: str | None = None  # opens /metrics and /health's details too (as the API key does)
    stream: StreamSettings = field(default_factory=StreamSettings)  # the cache shape of every session
    compress_threshold: int = 1024
    max_tokens_cap: int = 512
    max_body_bytes: int = 16 * 2**20
    timeout_s: float = 300.0
    slots: int = 8
    max_batch: int = 8  # answers decoded in one forward pass at most (1: each alone, in turn)
    max_queue: int = 64
    max_lookback: int = 1024  # the largest look-back (tokens) a request may ask for; 0: look-back off
    documents_dir: Path = field(default_factory=default_documents_dir)
    document_memory_bytes: int = 2**30
    max_documents: int | None = None  # then 507
    documents_quota_bytes: int | None = None  # on disk, all documents together (507; 413 for one alone)

    def __post_init__(self) -> None:
        self.documents_dir = Path(self.documents_dir).expanduser().absolute()
        positive = (
            "compress_threshold", "max_tokens_cap", "max_body_bytes", "slots", "max_batch", "document_memory_bytes",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_documents", "documents_quota_bytes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("api_key", "metrics_key"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise ValueError(f"the {name.replace('_', ' ')} is empty")
        if self.max_lookback < 0:
            raise ValueError(f"max-lookback must be >= 0 (0: look-back off), got {self.max_lookback}")
        if self.stream.lookback > self.max_lookback:
            raise ValueError(
                f"--lookback ({self.stream.lookback}) exceeds --max-lookback ({self.max_lookback}); raise the cap or "
                "lower the default"
            )
        if self.max_queue < 0:
            raise ValueError(f"max-queue must be >= 0, got {self.max_queue}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout_s}")
        sinks, budget = self.stream.sinks, self.stream.budget
        needed = sinks + self.compress_threshold + self.max_tokens_cap
        if needed > budget:
            raise ValueError(
                f"a prompt of compress-threshold ({self.compress_threshold}) tokens plus max-tokens-cap "
                f"({self.max_tokens_cap}) and {sinks} sinks needs {needed} cache entries, more than the budget "
                f"({budget}); lower --compress-threshold or --max-tokens-cap, or raise --budget"
            )
        if not self.served_model_name.strip():
            raise ValueError("served-model-name must not be empty")
