"""The decode worker's configuration: the worker and engine settings it shares with prefill
workers, plus when to prefill remotely."""

from dataclasses import dataclass, field

from shared.config import doc
from shared.engine.config import EngineConfig, WorkerConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeConfig:
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    min_remote_prefill_tokens: int = field(
        default=2048,
        metadata=doc(
            "prefill on a prefill worker only when at least this many prompt "
            "tokens are not cached here"
        ),
    )
    min_remote_prefill_fraction: float = field(
        default=0.3,
        metadata=doc("... and at least this fraction of the prompt is not cached here"),
    )
    prefill_timeout_s: float = field(
        default=60.0, metadata=doc("longest wait for a prefill worker before prefilling here")
    )
    transfer_timeout_s: float = field(
        default=30.0, metadata=doc("longest KV transfer before prefilling here instead")
    )

    def __post_init__(self) -> None:
        for name in ("prefill_timeout_s", "transfer_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
