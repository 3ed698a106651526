"""baton-bench's configuration: one frozen dataclass; every field is a flag and a
``BATON_BENCH_*`` env var (shared/config.py)."""

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.bench.arrivals import ARRIVAL_PROCESSES, parse_stages
from services.bench.workload import TRACE_FORMATS, parse_priority_mix
from shared.config import doc


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchConfig:
    url: str = field(default="http://127.0.0.1:8000", metadata=doc("server base URL"))
    model: str = field(default="", metadata=doc("model name (default: the first of /v1/models)"))
    # Arrivals
    arrival: str = field(default="poisson", metadata=doc("poisson, gamma or constant gaps"))
    burstiness: float = field(
        default=1.0,
        metadata=doc("gamma shape of the gaps (gamma only): 1 = Poisson, smaller = burstier"),
    )
    rate: float = field(default=10.0, metadata=doc("requests per second (without --stages)"))
    duration_s: float = field(default=10.0, metadata=doc("seconds of arrivals (without --stages)"))
    stages: str = field(
        default="",
        metadata=doc("piecewise-constant schedule 'R1:D1,R2:D2,...' (req/s : seconds)"),
    )
    ramp_s: float = field(
        default=0.0, metadata=doc("ramp the rate linearly from 0 into the first stage")
    )
    seed: int = field(default=0, metadata=doc("seed of arrival times and priorities"))
    prompt_seed: int | None = field(
        default=None,
        metadata=doc(
            "seed of prompt token ids (default: a fresh one per run, so that a run does not "
            "hit the prefix cache an earlier run filled)"
        ),
    )
    # Synthetic workload
    prompt_tokens: int = field(default=256, metadata=doc("random prompt token ids per request"))
    output_tokens: int = field(
        default=128, metadata=doc("tokens to generate per request (ignore_eos)")
    )
    prefix_tokens: int = field(
        default=0, metadata=doc("a prefix shared by every prompt, before its random tokens")
    )
    # Trace replay
    trace: str = field(
        default="", metadata=doc("replay this trace (Azure LLM 2023 CSV or Mooncake JSONL)")
    )
    trace_format: str = field(
        default="auto", metadata=doc("auto (by file suffix), azure or mooncake")
    )
    time_scale: float = field(default=1.0, metadata=doc("trace speed-up: 2 = twice the rate"))
    length_scale: float = field(default=1.0, metadata=doc("multiply trace token lengths by this"))
    max_prompt_tokens: int = field(
        default=4000, metadata=doc("clamp trace prompts (after scaling)")
    )
    max_output_tokens: int = field(
        default=1024, metadata=doc("clamp trace outputs (after scaling)")
    )
    trace_start_s: float = field(
        default=0.0, metadata=doc("window start, in trace seconds from its first request")
    )
    trace_duration_s: float = field(
        default=0.0, metadata=doc("window length in trace seconds (0: to the end)")
    )
    # Objectives and request fields
    slo_ttft_ms: float | None = field(
        default=None, metadata=doc("a good request's time to first token is at most this")
    )
    slo_tpot_ms: float | None = field(
        default=None, metadata=doc("a good request's time per output token is at most this")
    )
    send_slo: bool = field(
        default=False, metadata=doc("also send the objectives as slo_ttft_ms/slo_tpot_ms")
    )
    priority_mix: str = field(
        default="",
        metadata=doc("send 'priority' to fractions of requests, e.g. 'high=0.1,low=0.2'"),
    )
    shed_statuses: str = field(
        default="429", metadata=doc("HTTP statuses that count as shed, e.g. '429,503'")
    )
    # Client
    request_timeout_s: float = field(default=120.0, metadata=doc("per-request deadline"))
    client_procs: int = field(default=1, metadata=doc("client processes to spread arrivals"))
    quiet: bool = field(default=False, metadata=doc("no progress line on stderr"))
    # Output
    out: str = field(default="", metadata=doc("write the results as JSON here"))
    plot: str = field(default="", metadata=doc("draw the time series as PNG here (matplotlib)"))
    metrics_url: str = field(
        default="", metadata=doc("scrape this /metrics before and after (baton_* lines)")
    )
    watch_url: str = field(
        default="",
        metadata=doc(
            "sample this /metrics every second during the run (e.g. the planner's) and plot"
            " the --watch gauges over time"
        ),
    )
    watch: str = field(
        default="baton_planner_actual_workers",
        metadata=doc("comma-separated metric names --watch-url is sampled for"),
    )
    log_level: str = field(default="warning", metadata=doc("logging level"))

    def __post_init__(self) -> None:
        if self.arrival not in ARRIVAL_PROCESSES:
            raise ValueError(f"arrival must be one of {ARRIVAL_PROCESSES}, got {self.arrival!r}")
        if self.trace_format not in TRACE_FORMATS:
            raise ValueError(
                f"trace_format must be one of {TRACE_FORMATS}, got {self.trace_format!r}"
            )
        if self.trace and self.stages:
            raise ValueError("--trace and --stages exclude each other")
        parse_stages(self.stages)
        parse_priority_mix(self.priority_mix)
        self.shed_status_codes()
        for name in ("burstiness", "time_scale", "length_scale", "request_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("rate", "duration_s", "ramp_s", "trace_start_s", "trace_duration_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("prompt_tokens", "output_tokens", "max_prompt_tokens", "max_output_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prefix_tokens < 0:
            raise ValueError(f"prefix_tokens must be >= 0, got {self.prefix_tokens}")
        if not 1 <= self.client_procs <= 256:
            raise ValueError(f"client_procs must be in [1, 256], got {self.client_procs}")
        for name in ("slo_ttft_ms", "slo_tpot_ms"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")

    def shed_status_codes(self) -> frozenset[int]:
        """The statuses of ``shed_statuses``."""
        try:
            codes = frozenset(int(s) for s in self.shed_statuses.split(",") if s.strip())
        except ValueError as exc:
            raise ValueError(
                f"shed_statuses: expected '429,503', got {self.shed_statuses!r}"
            ) from exc
        if 200 in codes:
            raise ValueError("shed_statuses must not hold 200")
        return codes


def bool_flags() -> frozenset[str]:
    """The ``--flags`` of boolean fields (they may be given bare: ``--quiet``)."""
    return frozenset(
        "--" + f.name.replace("_", "-")
        for f in dataclasses.fields(BenchConfig)
        if f.type in (bool, "bool")
    )


def expand_bare_flags(argv: Sequence[str]) -> list[str]:
    """``--quiet`` alone means ``--quiet=true``: shared/config.py's boolean flags take a value,
    and a bare switch is what users of load generators type."""
    flags = bool_flags()
    expanded: list[str] = []
    for i, arg in enumerate(argv):
        following = argv[i + 1] if i + 1 < len(argv) else "--"
        expanded.append(f"{arg}=true" if arg in flags and following.startswith("-") else arg)
    return expanded
