"""The worker's configuration: its role, the settings every worker shares, its engine, and
the few settings of one role."""

from dataclasses import dataclass, field

from proto.messages import WorkerRole
from shared.config import doc
from shared.engine.config import EngineConfig, WorkerConfig

ROLES = {"prefill": WorkerRole.PREFILL, "decode": WorkerRole.DECODE}
DRAIN_HANDOFFS = ("kv", "recompute", "finish")


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerServiceConfig:
    role: str = field(default="decode", metadata=doc("prefill or decode"))
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    prefill_timeout_s: float = field(
        default=60.0,
        metadata=doc("decode: longest wait for a prefill worker before prefilling here"),
    )
    transfer_timeout_s: float = field(
        default=30.0, metadata=doc("decode: longest KV transfer before prefilling here instead")
    )
    max_hold_s: float = field(
        default=30.0,
        metadata=doc(
            "prefill: free a prompt's KV this long after prefill if no decode worker read it;"
            " decode, draining: free a moved stream's KV this long after the move"
        ),
    )
    publish_interval_ms: float = field(
        default=2.0,
        metadata=doc(
            "decode: engine steps faster than this send their tokens together, at most this "
            "long (or one step) later, one message per frontend (0: each step's at once)"
        ),
    )
    drain_handoff: str = field(
        default="kv",
        metadata=doc(
            "decode, on drain (SIGTERM), when a decode peer is live: kv (move the streams with"
            " their KV: live migration), recompute (move them; the peer recomputes their KV)"
            " or finish (finish them here, up to the drain timeout)"
        ),
    )

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {sorted(ROLES)}, got {self.role!r}")
        if self.drain_handoff not in DRAIN_HANDOFFS:
            raise ValueError(
                f"drain_handoff must be one of {DRAIN_HANDOFFS}, got {self.drain_handoff!r}"
            )
        if not self.publish_interval_ms >= 0:
            raise ValueError(f"publish_interval_ms must be >= 0, got {self.publish_interval_ms}")
        for name in ("prefill_timeout_s", "transfer_timeout_s", "max_hold_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def worker_role(self) -> WorkerRole:
        return ROLES[self.role]
