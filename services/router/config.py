"""The router's configuration."""

from dataclasses import dataclass, field

from proto.subjects import check_token
from shared.config import doc
from shared.routing.cost import RoutingMode


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
    resync_timeout_s: float = field(
        default=5.0, metadata=doc("how long a worker may take to send its cached blocks")
    )
    host: str = field(default="127.0.0.1", metadata=doc("metrics HTTP address"))
    port: int = field(default=0, metadata=doc("metrics HTTP port (0 picks a free one)"))
    log_level: str = field(default="info", metadata=doc("logging level"))

    def __post_init__(self) -> None:
        check_token(self.namespace, "namespace")
        if self.router_id:
            check_token(self.router_id, "router_id")
        modes = [m.value for m in RoutingMode]
        if self.mode not in modes:
            raise ValueError(f"mode must be one of {modes}, got {self.mode!r}")
        if self.max_index_entries < 1:
            raise ValueError(f"max_index_entries must be >= 1, got {self.max_index_entries}")
