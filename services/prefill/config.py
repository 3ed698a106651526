"""The prefill worker's configuration."""

from dataclasses import dataclass, field

from shared.engine.config import EngineConfig, WorkerConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class PrefillConfig:
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    max_hold_s: float = field(
        default=30.0,
        metadata={"help": "free a prompt's KV this long after prefill if no decode worker read it"},
    )

    def __post_init__(self) -> None:
        if self.max_hold_s <= 0:
            raise ValueError(f"max_hold_s must be > 0, got {self.max_hold_s}")
