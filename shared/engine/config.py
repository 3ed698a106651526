"""Engine settings shared by the prefill and decode workers (flattened into their flags)."""

from dataclasses import dataclass, field

from proto.subjects import check_token
from shared.config import doc
from shared.security import ClusterSecurity
from shared.slo import SLOConfig

ENGINE_KINDS = ("sim", "torch", "vllm")


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    engine: str = field(
        default="sim", metadata=doc("engine kind: sim, torch or vllm (docs/vllm.md)")
    )
    model: str = field(default="baton-sim", metadata=doc("model name served"))
    model_path: str = field(
        default="random",
        metadata=doc(
            "torch and vllm engines: a Hugging Face model directory, or 'random' for a "
            "small random model built from --seed"
        ),
    )
    tokenizer: str = field(
        default="builtin", metadata=doc("tokenizer directory, or 'builtin' for the shipped one")
    )
    num_kv_blocks: int = field(default=65536, metadata=doc("KV cache size in blocks"))
    block_size: int = field(default=16, metadata=doc("tokens per KV block"))
    max_num_seqs: int = field(default=1024, metadata=doc("most sequences in one batch"))
    max_num_batched_tokens: int = field(
        default=8192, metadata=doc("most prompt tokens prefilled in one step")
    )
    max_model_len: int = field(default=8192, metadata=doc("context length in tokens"))
    speedup: float = field(
        default=1.0, metadata=doc("sim engine: divide every modelled step time by this")
    )
    mean_output_tokens: int = field(
        default=128, metadata=doc("sim engine: mean natural output length before EOS")
    )
    seed: int = field(
        default=0, metadata=doc("engine seed: the sim's token stream, the random model's weights")
    )
    device: str = field(default="cpu", metadata=doc("torch engine: cpu, cuda or cuda:N"))
    dtype: str = field(
        default="float32", metadata=doc("torch and vllm engines: float32, bfloat16, float16")
    )
    torch_threads: int = field(
        default=1, metadata=doc("torch engine on CPU: intra-op threads (0: torch's default)")
    )

    def __post_init__(self) -> None:
        if self.engine not in ENGINE_KINDS:
            raise ValueError(f"engine must be one of {ENGINE_KINDS}, got {self.engine!r}")
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
        if self.speedup <= 0:
            raise ValueError(f"speedup must be > 0, got {self.speedup}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.torch_threads < 0:
            raise ValueError(f"torch_threads must be >= 0, got {self.torch_threads}")


TRANSFER_KINDS = ("auto", "shm", "tcp", "nixl", "cuda_ipc", "none")


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    """What every engine-serving worker (prefill or decode) needs besides its engine."""

    namespace: str = field(default="default", metadata=doc("cluster namespace"))
    nats_url: str = field(default="nats://127.0.0.1:4222", metadata=doc("NATS server URL"))
    etcd_url: str = field(default="http://127.0.0.1:2379", metadata=doc("etcd URL"))
    worker_id: str = field(default="", metadata=doc("instance id (default: role-host-pid-random)"))
    max_waiting: int = field(
        default=4096, metadata=doc("queued requests beyond which new ones are refused (503)")
    )
    kv_transfer: str = field(
        default="auto",
        metadata=doc(
            "KV transfer transport: auto (host memory: shm on one host, else nixl, else tcp; "
            "GPU memory: cuda_ipc on one machine, else nixl), shm, tcp, nixl, cuda_ipc, or none"
        ),
    )
    kv_transfer_host: str = field(
        default="127.0.0.1", metadata=doc("address the tcp transport listens on")
    )
    lease_ttl_s: float = field(default=10.0, metadata=doc("etcd lease TTL"))
    drain_timeout_s: float = field(
        default=30.0, metadata=doc("on SIGTERM, how long in-flight requests may finish")
    )
    load_interval_s: float = field(
        default=0.1,
        metadata=doc("load metrics period (frontends shed early from these reports)"),
    )
    log_level: str = field(default="info", metadata=doc("logging level"))
    http_host: str = field(default="127.0.0.1", metadata=doc("health and metrics HTTP address"))
    http_port: int = field(
        default=0,
        metadata=doc("/health, /ready and /metrics port (0: any free port; -1: no HTTP)"),
    )
    slo: SLOConfig = field(default_factory=SLOConfig)
    security: ClusterSecurity = field(default_factory=ClusterSecurity)  # NATS and etcd

    def __post_init__(self) -> None:
        check_token(self.namespace, "namespace")
        if self.worker_id:
            check_token(self.worker_id, "worker_id")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.kv_transfer not in TRANSFER_KINDS:
            raise ValueError(
                f"kv_transfer must be one of {TRANSFER_KINDS}, got {self.kv_transfer!r}"
            )
        if self.lease_ttl_s < 1:
            raise ValueError(f"lease_ttl_s must be >= 1, got {self.lease_ttl_s}")
        if not -1 <= self.http_port < 65536:
            raise ValueError(f"http_port must be in [-1, 65535], got {self.http_port}")
