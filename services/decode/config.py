"""The decode worker's configuration (aggregated prefill+decode until prefill workers exist)."""

import os
import socket
import uuid
from dataclasses import dataclass, field

from proto.subjects import check_token


def default_worker_id() -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"decode-{host[:24]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeConfig:
    namespace: str = field(default="default", metadata=_help("cluster namespace"))
    nats_url: str = field(default="nats://127.0.0.1:4222", metadata=_help("NATS server URL"))
    etcd_url: str = field(default="http://127.0.0.1:2379", metadata=_help("etcd URL"))
    worker_id: str = field(default="", metadata=_help("instance id (default: host-pid-random)"))
    model: str = field(default="baton-sim", metadata=_help("model name served"))
    tokenizer: str = field(
        default="builtin", metadata=_help("tokenizer directory, or 'builtin' for the shipped one")
    )
    engine: str = field(default="sim", metadata=_help("engine kind: sim"))
    num_kv_blocks: int = field(default=65536, metadata=_help("KV cache size in blocks"))
    block_size: int = field(default=16, metadata=_help("tokens per KV block"))
    max_num_seqs: int = field(default=1024, metadata=_help("most sequences in one batch"))
    max_num_batched_tokens: int = field(
        default=8192, metadata=_help("most prompt tokens prefilled in one step")
    )
    max_model_len: int = field(default=8192, metadata=_help("context length in tokens"))
    max_waiting: int = field(
        default=4096, metadata=_help("queued requests beyond which new ones are refused (503)")
    )
    speedup: float = field(
        default=1.0, metadata=_help("sim engine: divide every modelled step time by this")
    )
    mean_output_tokens: int = field(
        default=128, metadata=_help("sim engine: mean natural output length before EOS")
    )
    seed: int = field(default=0, metadata=_help("engine seed (deterministic outputs)"))
    lease_ttl_s: float = field(default=10.0, metadata=_help("etcd lease TTL"))
    drain_timeout_s: float = field(
        default=30.0, metadata=_help("on SIGTERM, how long in-flight requests may finish")
    )
    load_interval_s: float = field(default=0.25, metadata=_help("load metrics period"))
    log_level: str = field(default="info", metadata=_help("logging level"))

    def __post_init__(self) -> None:
        check_token(self.namespace, "namespace")
        if self.worker_id:
            check_token(self.worker_id, "worker_id")
        if self.engine != "sim":
            raise ValueError(f"engine must be 'sim', got {self.engine!r}")
        for name in (
            "num_kv_blocks",
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
            "mean_output_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.speedup <= 0:
            raise ValueError(f"speedup must be > 0, got {self.speedup}")
        if self.lease_ttl_s < 1:
            raise ValueError(f"lease_ttl_s must be >= 1, got {self.lease_ttl_s}")
