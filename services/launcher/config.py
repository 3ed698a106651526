"""`baton up` configuration."""

from dataclasses import dataclass, field

from proto.subjects import check_token
from services.launcher.spec import ClusterSpec
from shared.config import doc
from shared.lifecycle import default_num_procs
from shared.security import ClusterSecurity
from shared.slo import SLOConfig

AUTO_NICE = -1  # UpConfig.frontend_nice: chosen by the objectives (frontend_niceness)


@dataclass(frozen=True, slots=True, kw_only=True)
class UpConfig:
    namespace: str = field(default="default", metadata=doc("cluster namespace"))
    nats_url: str = field(
        default="", metadata=doc("use this NATS server (default: start one on a free port)")
    )
    etcd_url: str = field(
        default="", metadata=doc("use this etcd (default: start one on a free port)")
    )
    host: str = field(default="127.0.0.1", metadata=doc("frontend listen address"))
    port: int = field(default=8000, metadata=doc("frontend HTTP port (0 picks a free one)"))
    num_workers: int = field(default=2, metadata=doc("decode workers to start"))
    num_frontends: int = field(
        default=0,
        metadata=doc(
            "frontend processes sharing the HTTP port (0: one per core, at least 2, or more"
            " where the per-process open-file limit needs them for 50,000 connections; at"
            " most 8; with a TTFT objective one per core; docs/performance.md)"
        ),
    )
    frontend_nice: int = field(
        default=AUTO_NICE,
        metadata=doc(
            "niceness added to the frontend processes (0-19; -1: 0 with a TTFT objective,"
            " 5 without): every process shares this host's CPUs. Without objectives the"
            " frontends yield to the engines, whose steps set the pace; with one, admission"
            " keeps the engines' load in bounds and the frontends' sheds must not wait for a"
            " core (docs/admission.md)"
        ),
    )
    num_prefill_workers: int = field(
        default=0,
        metadata=doc("prefill workers to start (0: aggregated; more: disaggregated)"),
    )
    num_routers: int = field(
        default=1, metadata=doc("KV-aware routers to start (0: frontends place by load)")
    )
    router_mode: str = field(
        default="kv", metadata=doc("routing mode: kv, round_robin, random, least_loaded")
    )
    model: str = field(default="baton-sim", metadata=doc("model name the workers serve"))
    engine: str = field(default="sim", metadata=doc("engine kind of the workers"))
    speedup: float = field(default=1.0, metadata=doc("sim engine time divisor"))
    log_dir: str = field(default="", metadata=doc("write each process's log here"))
    ready_timeout_s: float = field(
        default=0.0,
        metadata=doc(
            "how long start-up may take (0: 60 s; 300 s for --engine vllm, which takes up to "
            "a minute to import and start on a busy machine)"
        ),
    )
    log_level: str = field(default="info", metadata=doc("logging level"))
    supervise: bool = field(
        default=True,
        metadata=doc(
            "restart a process that exits (backoff 0.5 s doubling to 10 s) instead of leaving "
            "it dead"
        ),
    )
    slo: SLOConfig = field(default_factory=SLOConfig)  # passed on to every service
    secure: bool = field(
        default=False,
        metadata=doc(
            "the NATS and etcd it starts require random passwords and TLS (a throwaway CA in "
            "a temp dir); every process gets them"
        ),
    )
    api_key: str = field(
        default="",
        metadata={
            **doc("the frontend's API keys (its --api-key), comma-separated"),
            "secret": True,
        },
    )
    # Credentials for the NATS and etcd given by URL, passed on to every service.
    security: ClusterSecurity = field(default_factory=ClusterSecurity)
    planner: bool = field(
        default=False,
        metadata=doc(
            "run the planner: add and retire decode workers with the load (docs/planner.md)"
        ),
    )
    max_workers: int = field(
        default=8, metadata=doc("with --planner: the most decode workers it may run")
    )
    max_prefill_workers: int = field(
        default=0,
        metadata=doc(
            "with --planner and prefill workers: the most prefill workers it may run"
            " (0: --num-prefill-workers, a fixed prefill pool)"
        ),
    )
    min_prefill_workers: int = field(
        default=1,
        metadata=doc(
            "with --planner and prefill workers: the fewest prefill workers (0: it may switch"
            " or retire them all; decode workers then prefill their own prompts)"
        ),
    )
    max_total_workers: int = field(
        default=0,
        metadata=doc(
            "with --planner: the most decode and prefill workers together (0: no cap); at"
            " the cap it moves capacity by switching a worker's role"
        ),
    )
    min_total_workers: int = field(
        default=0,
        metadata=doc(
            "with --planner: the fewest decode and prefill workers together (0: no floor);"
            " equal to --max-total-workers, the total is fixed and only role switches move"
            " capacity"
        ),
    )
    planner_mode: str = field(default="load", metadata=doc("with --planner: load or sla"))
    num_standby_workers: int = field(
        default=1,
        metadata=doc(
            "with --planner: decode worker processes kept started and warm, unregistered, so "
            "that a scale-up serves in a few tenths of a second (0: start workers cold)"
        ),
    )

    def __post_init__(self) -> None:
        check_token(self.namespace, "namespace")
        if not self.ready_timeout_s >= 0:
            raise ValueError(f"ready_timeout_s must be >= 0, got {self.ready_timeout_s}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.num_routers < 0:
            raise ValueError(f"num_routers must be >= 0, got {self.num_routers}")
        if self.num_frontends < 0:
            raise ValueError(f"num_frontends must be >= 0, got {self.num_frontends}")
        if not AUTO_NICE <= self.frontend_nice <= 19:
            raise ValueError(
                f"frontend_nice must be in [0, 19] or {AUTO_NICE}, got {self.frontend_nice}"
            )
        if self.num_prefill_workers < 0:
            raise ValueError(f"num_prefill_workers must be >= 0, got {self.num_prefill_workers}")
        if min(self.min_prefill_workers, self.max_total_workers, self.min_total_workers) < 0:
            raise ValueError(
                f"min_prefill_workers, max_total_workers and min_total_workers must be >= 0, "
                f"got {self.min_prefill_workers}, {self.max_total_workers} and "
                f"{self.min_total_workers}"
            )
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.num_standby_workers < 0:
            raise ValueError(f"num_standby_workers must be >= 0, got {self.num_standby_workers}")
        if self.max_prefill_workers and self.max_prefill_workers < self.num_prefill_workers:
            raise ValueError(
                f"max_prefill_workers must be 0 or >= num_prefill_workers "
                f"({self.num_prefill_workers}), got {self.max_prefill_workers}"
            )
        if self.planner and self.max_workers < self.num_workers:
            raise ValueError(
                f"max_workers must be >= num_workers ({self.num_workers}), got {self.max_workers}"
            )

    @property
    def frontend_niceness(self) -> int:
        """``frontend_nice``, with ``AUTO_NICE`` read as 0 where a TTFT objective is set
        (the frontends shed what the engines cannot serve, and a shed that waits for a core
        is late) and 5 where none is (every request is served, and the engines set the
        pace)."""
        if self.frontend_nice != AUTO_NICE:
            return self.frontend_nice
        return 0 if self.slo.slo_ttft_ms > 0 else 5

    def cluster_spec(self) -> ClusterSpec:
        """The cluster these flags describe."""
        engine = ("--model", self.model, "--engine", self.engine, "--speedup", str(self.speedup))
        return ClusterSpec(
            namespace=self.namespace,
            nats_url=self.nats_url,
            etcd_url=self.etcd_url,
            host=self.host,
            port=self.port,
            num_routers=self.num_routers,
            num_prefill_workers=self.num_prefill_workers,
            num_workers=self.num_workers,
            num_frontends=self.num_frontends
            or default_num_procs(sheds=self.slo.ttft_s is not None),
            frontend_args=("--nice", str(self.frontend_niceness)),
            router_args=("--mode", self.router_mode),
            prefill_args=engine,
            decode_args=engine,
            log_dir=self.log_dir,
            log_level=self.log_level,
            ready_timeout_s=self.ready_timeout_s or (300.0 if self.engine == "vllm" else 60.0),
            supervise=self.supervise,
            secure=self.secure,
            planner=self.planner,
            max_workers=self.max_workers if self.planner else 0,
            max_prefill_workers=self.max_prefill_workers if self.planner else 0,
            min_prefill_workers=self.min_prefill_workers,
            max_total_workers=self.max_total_workers if self.planner else 0,
            min_total_workers=self.min_total_workers if self.planner else 0,
            planner_args=("--mode", self.planner_mode),
            num_standby_workers=self.num_standby_workers,
            # Every service that has objectives reads these (the frontend and the workers).
            env={
                "BATON_SLO_TTFT_MS": str(self.slo.slo_ttft_ms),
                "BATON_SLO_TPOT_MS": str(self.slo.slo_tpot_ms),
                "BATON_SLO_ADMIT_FRACTION": str(self.slo.slo_admit_fraction),
                **self.security.env(),
                **({"BATON_FRONTEND_API_KEY": self.api_key} if self.api_key else {}),
            },
        )
