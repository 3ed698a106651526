"""`baton up` configuration."""

from dataclasses import dataclass, field

from proto.subjects import check_token


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True, slots=True, kw_only=True)
class UpConfig:
    namespace: str = field(default="default", metadata=_help("cluster namespace"))
    nats_url: str = field(
        default="", metadata=_help("use this NATS server (default: start one on a free port)")
    )
    etcd_url: str = field(
        default="", metadata=_help("use this etcd (default: start one on a free port)")
    )
    host: str = field(default="127.0.0.1", metadata=_help("frontend listen address"))
    port: int = field(default=8000, metadata=_help("frontend HTTP port (0 picks a free one)"))
    num_workers: int = field(default=2, metadata=_help("decode workers to start"))
    num_prefill_workers: int = field(
        default=0,
        metadata=_help("prefill workers to start (0: aggregated; more: disaggregated)"),
    )
    num_routers: int = field(
        default=1, metadata=_help("KV-aware routers to start (0: frontends place by load)")
    )
    router_mode: str = field(
        default="kv", metadata=_help("routing mode: kv, round_robin, random, least_loaded")
    )
    model: str = field(default="baton-sim", metadata=_help("model name the workers serve"))
    engine: str = field(default="sim", metadata=_help("engine kind of the workers"))
    speedup: float = field(default=1.0, metadata=_help("sim engine time divisor"))
    log_dir: str = field(default="", metadata=_help("write each process's log here"))
    ready_timeout_s: float = field(default=60.0, metadata=_help("how long start-up may take"))
    log_level: str = field(default="info", metadata=_help("logging level"))

    def __post_init__(self) -> None:
        check_token(self.namespace, "namespace")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.num_routers < 0:
            raise ValueError(f"num_routers must be >= 0, got {self.num_routers}")
        if self.num_prefill_workers < 0:
            raise ValueError(f"num_prefill_workers must be >= 0, got {self.num_prefill_workers}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
