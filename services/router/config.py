"""The router's configuration."""

import os
import socket
import uuid
from dataclasses import dataclass, field

from proto.subjects import check_token
from shared.routing.cost import RoutingMode


def default_router_id() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"router-{host[:24]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True, slots=True, kw_only=True)
class RouterConfig:
    namespace: str = field(default="default", metadata=_help("cluster namespace"))
    nats_url: str = field(default="nats://127.0.0.1:4222", metadata=_help("NATS server URL"))
    etcd_url: str = field(default="http://127.0.0.1:2379", metadata=_help("etcd URL"))
    router_id: str = field(default="", metadata=_help("instance id (default: host-pid-random)"))
    mode: str = field(default="kv", metadata=_help("kv, round_robin, random or least_loaded"))
    prefill_weight: float = field(
        default=1.0, metadata=_help("cost per prompt block a worker would have to prefill")
    )
    decode_weight: float = field(
        default=0.05, metadata=_help("cost per KV block a worker already serves")
    )
    max_kv_usage: float = field(
        default=0.9, metadata=_help("a worker over this KV usage is chosen only as a last resort")
    )
    max_num_waiting: int = field(
        default=32, metadata=_help("a worker with more waiting is chosen only as a last resort")
    )
    temperature: float = field(
        default=0.0, metadata=_help("0: lowest cost; > 0: sample among near-equal workers")
    )
    max_index_entries: int = field(
        default=4_000_000, metadata=_help("bound on (block, worker) entries in the index")
    )
    resync_timeout_s: float = field(
        default=5.0, metadata=_help("how long a worker may take to send its cached blocks")
    )
    host: str = field(default="127.0.0.1", metadata=_help("metrics HTTP address"))
    port: int = field(default=0, metadata=_help("metrics HTTP port (0 picks a free one)"))
    log_level: str = field(default="info", metadata=_help("logging level"))

    def __post_init__(self) -> None:
        check_token(self.namespace, "namespace")
        if self.router_id:
            check_token(self.router_id, "router_id")
        modes = [m.value for m in RoutingMode]
        if self.mode not in modes:
            raise ValueError(f"mode must be one of {modes}, got {self.mode!r}")
        if self.max_index_entries < 1:
            raise ValueError(f"max_index_entries must be >= 1, got {self.max_index_entries}")
