"""The frontend's configuration."""

from dataclasses import dataclass, field

from proto.subjects import check_token
from shared.config import doc
from shared.security import ClusterSecurity
from shared.slo import SLOConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class FrontendConfig:
    namespace: str = field(default="default", metadata=doc("cluster namespace"))
    nats_url: str = field(default="nats://127.0.0.1:4222", metadata=doc("NATS server URL"))
    etcd_url: str = field(default="http://127.0.0.1:2379", metadata=doc("etcd URL"))
    host: str = field(default="127.0.0.1", metadata=doc("HTTP listen address"))
    port: int = field(default=8000, metadata=doc("HTTP port (0 picks a free one)"))
    frontend_id: str = field(default="", metadata=doc("instance id (default: host-pid-random)"))
    procs: int = field(
        default=1,
        metadata=doc(
            "processes serving this port together (SO_REUSEPORT, each with its own NATS "
            "connection); 0: one per core (2 to 8), or more if 50,000 connections need them "
            "for their open files, unless a TTFT objective is set (docs/performance.md)"
        ),
    )
    nice: int = field(
        default=0,
        metadata=doc(
            "add this to the processes' niceness (0: none): where engines share the CPUs, "
            "frontends that yield to them shed what the engines cannot serve instead of "
            "taking the CPU the engines serve with"
        ),
    )
    reuse_port: bool = field(
        default=False,
        metadata=doc("share the port with other frontend processes (set for you by --procs)"),
    )
    metrics_dir: str = field(
        default="",
        metadata=doc(
            "directory where the processes of one frontend share their metrics, so that "
            "each /metrics answers for all (set for you by --procs)"
        ),
    )
    queue_timeout_s: float = field(
        default=120.0,
        metadata=doc(
            "without a TTFT objective: how long a request may wait in this process for a "
            "worker with room before it gets 503 (0: refuse at once)"
        ),
    )
    write_timeout_s: float = field(
        default=30.0,
        metadata=doc(
            "a client that reads nothing of its stream for this long is cut (its buffer is "
            "bounded by the transport's high-water mark meanwhile)"
        ),
    )
    max_in_flight: int = field(
        default=50000, metadata=doc("requests served at once before new ones get 503")
    )
    admission_timeout_s: float = field(
        default=5.0, metadata=doc("how long a worker may take to accept a request")
    )
    route_timeout_s: float = field(
        default=0.05,
        metadata=doc(
            "how long to wait for a router's answer before placing a request "
            "by load alone (0: never ask a router)"
        ),
    )
    stream_idle_timeout_s: float = field(
        default=120.0,
        metadata=doc(
            "a stream with no tokens for this long fails (and moves) if its worker has sent "
            "nothing else meanwhile either (no load report: hung or gone)"
        ),
    )
    stream_max_idle_s: float = field(
        default=600.0,
        metadata=doc(
            "a stream with no tokens for this long fails (and moves) even though its worker "
            "is heard from: a request may wait in a worker's queue that long, not longer (a "
            "lost request, or an engine stuck while its process still reports)"
        ),
    )
    tokenize_in_thread_chars: int = field(
        default=4096, metadata=doc("prompts at least this long are tokenized in a thread")
    )
    drain_timeout_s: float = field(
        default=30.0, metadata=doc("on SIGTERM, how long open streams may finish")
    )
    log_level: str = field(default="info", metadata=doc("logging level"))
    max_loop_lag_ms: float = field(
        default=25.0,
        metadata=doc(
            "with a TTFT objective: while this process's event loop runs later than this, "
            "a growing fraction of new requests get 429 before their body is read, and a "
            "shrinking one while it runs earlier (0: never)"
        ),
    )
    migration_limit: int = field(
        default=3,
        metadata=doc(
            "times a stream may move to another worker when its worker dies or drops it "
            "(0: never; the stream then ends with an error)"
        ),
    )
    worker_silence_s: float = field(
        default=0.5,
        metadata=doc(
            "a worker without a load report for this long is presumed dead: its streams "
            "migrate (the etcd lease is the backstop)"
        ),
    )
    goodput_window_s: float = field(
        default=60.0, metadata=doc("window of the goodput ratio on /metrics")
    )
    # HTTP hardening (docs/security.md#http): limits, API keys.
    max_body_bytes: int = field(
        default=16 * 1024 * 1024, metadata=doc("largest request body; larger gets 413")
    )
    max_header_bytes: int = field(
        default=16 * 1024,
        metadata=doc(
            "largest total size of a request's headers; larger gets 431 (one header or the "
            "request line over 4x this is cut off by the HTTP parser with a plain 400)"
        ),
    )
    max_messages: int = field(
        default=2048, metadata=doc("most messages in one chat request; more gets 400")
    )
    max_prompt_chars: int = field(
        default=1_000_000,
        metadata=doc(
            "most characters of prompt text in one request, checked before tokenizing; more "
            "gets 400 (tokens are bounded by the model's context)"
        ),
    )
    max_stop_strings: int = field(
        default=16, metadata=doc("most stop strings in one request; more gets 400")
    )
    api_key: str = field(
        default="",
        metadata={
            **doc("API keys clients must send as 'Authorization: Bearer KEY', comma-separated"),
            "secret": True,
        },
    )
    api_key_file: str = field(
        default="", metadata=doc("file of API keys, one a line (# starts a comment)")
    )
    metrics_require_key: bool = field(
        default=False, metadata=doc("with API keys: /metrics needs one too")
    )
    slo: SLOConfig = field(default_factory=SLOConfig)
    security: ClusterSecurity = field(default_factory=ClusterSecurity)  # NATS and etcd

    def __post_init__(self) -> None:
        check_token(self.namespace, "namespace")
        if self.frontend_id:
            check_token(self.frontend_id, "frontend_id")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.procs < 0:
            raise ValueError(f"procs must be >= 0, got {self.procs}")
        if not 0 <= self.nice <= 19:
            raise ValueError(f"nice must be in [0, 19], got {self.nice}")
        for name in ("queue_timeout_s", "write_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in (
            "max_in_flight",
            "tokenize_in_thread_chars",
            "max_body_bytes",
            "max_header_bytes",
            "max_messages",
            "max_prompt_chars",
            "max_stop_strings",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.route_timeout_s < 0:
            raise ValueError(f"route_timeout_s must be >= 0, got {self.route_timeout_s}")
        if self.max_loop_lag_ms < 0:
            raise ValueError(f"max_loop_lag_ms must be >= 0, got {self.max_loop_lag_ms}")
        if self.migration_limit < 0:
            raise ValueError(f"migration_limit must be >= 0, got {self.migration_limit}")
        if self.worker_silence_s <= 0:
            raise ValueError(f"worker_silence_s must be > 0, got {self.worker_silence_s}")
        if self.goodput_window_s < 1:
            raise ValueError(f"goodput_window_s must be >= 1, got {self.goodput_window_s}")
        for name in ("admission_timeout_s", "stream_idle_timeout_s", "stream_max_idle_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
