"""The router's configuration."""

from dataclasses import dataclass, field

from proto.subjects import check_token
from shared.config import doc
from shared.routing.cost import RoutingMode
from shared.routing.disagg import DisaggPolicy
from shared.security import ClusterSecurity


@dataclass(frozen=True, slots=True, kw_only=True)
class RouterConfig:
    namespace: str = field(default="default", metadata=doc("cluster namespace"))
    nats_url: str = field(default="nats://127.0.0.1:4222", metadata=doc("NATS server URL"))
    etcd_url: str = field(default="http://127.0.0.1:2379", metadata=doc("etcd URL"))
    router_id: str = field(default="", metadata=doc("instance id (default: host-pid-random)"))
    mode: str = field(default="kv", metadata=doc("kv, round_robin, random or least_loaded"))
    prefill_weight: float = field(
        default=1.0, metadata=doc("cost per prompt block a worker would have to prefill")
    )
    decode_weight: float = field(
        default=0.05, metadata=doc("cost per KV block a worker already serves")
    )
    max_kv_usage: float = field(
        default=0.9, metadata=doc("a worker over this KV usage is chosen only as a last resort")
    )
    max_num_waiting: int = field(
        default=32, metadata=doc("a worker with more waiting is chosen only as a last resort")
    )
    temperature: float = field(
        default=0.0, metadata=doc("0: lowest cost; > 0: sample among near-equal workers")
    )
    max_index_entries: int = field(
        default=4_000_000, metadata=doc("bound on (block, worker) entries in the index")
    )
    min_remote_prefill_tokens: int = field(
        default=2048,
        metadata=doc(
            "prefill on a prefill worker only when at least this many prompt tokens are not "
            "cached on the chosen decode worker"
        ),
    )
    min_remote_prefill_fraction: float = field(
        default=0.3,
        metadata=doc("... and at least this fraction of the prompt is not cached there"),
    )
    max_remote_prefill_extra_wait_s: float = field(
        default=0.25,
        metadata=doc(
            "... and the prefill pool would not make the prompt wait this much longer than "
            "the decode worker's own queue would (inf: always remote)"
        ),
    )
    resync_timeout_s: float = field(
        default=5.0, metadata=doc("how long a worker may take to send its cached blocks")
    )
    host: str = field(default="127.0.0.1", metadata=doc("metrics HTTP address"))
    port: int = field(default=0, metadata=doc("metrics HTTP port (0 picks a free one)"))
    log_level: str = field(default="info", metadata=doc("logging level"))
    security: ClusterSecurity = field(default_factory=ClusterSecurity)  # NATS and etcd

    def __post_init__(self) -> None:
        check_token(self.namespace, "namespace")
        if self.router_id:
            check_token(self.router_id, "router_id")
        modes = [m.value for m in RoutingMode]
        if self.mode not in modes:
            raise ValueError(f"mode must be one of {modes}, got {self.mode!r}")
        if self.max_index_entries < 1:
            raise ValueError(f"max_index_entries must be >= 1, got {self.max_index_entries}")
        try:
            self.disagg_policy()
        except ValueError as exc:
            raise ValueError(f"bad remote prefill thresholds: {exc}") from exc

    def disagg_policy(self) -> DisaggPolicy:
        """When a prefill is worth moving to a prefill worker (the ``*_remote_prefill_*``)."""
        return DisaggPolicy(
            min_remote_tokens=self.min_remote_prefill_tokens,
            min_remote_fraction=self.min_remote_prefill_fraction,
            max_extra_wait_s=self.max_remote_prefill_extra_wait_s,
        )
