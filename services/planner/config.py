"""The planner's configuration."""

import re
from dataclasses import dataclass, field

from proto.subjects import check_token
from services.planner.policy import Limits, Mode, PolicyConfig
from services.planner.signals import Role, Thresholds
from shared.config import doc
from shared.security import ClusterSecurity
from shared.slo import SLOConfig

CONNECTORS = ("dry-run", "local", "kubernetes")

# Kubernetes names: a namespace is a DNS-1123 label, a Deployment's name a DNS-1123 subdomain.
_DNS_PART = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_LABEL = re.compile(rf"(?=.{{1,63}}$){_DNS_PART}")
_DNS_SUBDOMAIN = re.compile(rf"(?=.{{1,253}}$){_DNS_PART}(\.{_DNS_PART})*")


@dataclass(frozen=True, slots=True, kw_only=True)
class KubernetesConfig:
    """Where ``--connector kubernetes`` finds the API server and the workers' Deployments."""

    k8s_namespace: str = field(
        default="",
        metadata=doc(
            "Kubernetes namespace of the worker Deployments (default: the pod's own in a "
            "cluster, else the kubeconfig context's, else default)"
        ),
    )
    k8s_decode_deployment: str = field(
        default="baton-decode", metadata=doc("Deployment of the decode workers")
    )
    k8s_prefill_deployment: str = field(
        default="baton-prefill", metadata=doc("Deployment of the prefill workers")
    )
    k8s_workers_deployment: str = field(
        default="",
        metadata=doc(
            "one Deployment for prefill and decode workers alike, instead of one per role: "
            "the planner scales it to the pools' total and switches its pods' roles over the "
            "bus (new pods start in the role its pod template says)"
        ),
    )
    k8s_api_url: str = field(
        default="",
        metadata=doc(
            "Kubernetes API server URL, replacing the one found (e.g. http://127.0.0.1:8001 "
            "for kubectl proxy; default: in-cluster, else the kubeconfig's)"
        ),
    )
    k8s_kubeconfig: str = field(
        default="",
        metadata=doc(
            "kubeconfig file (default: the pod's service account in a cluster, else "
            "$KUBECONFIG, else ~/.kube/config)"
        ),
    )
    k8s_timeout_s: float = field(
        default=2.0, metadata=doc("longest wait for the Kubernetes API on one scaling")
    )

    def __post_init__(self) -> None:
        if self.k8s_namespace and not _DNS_LABEL.fullmatch(self.k8s_namespace):
            raise ValueError(f"k8s_namespace must be a DNS-1123 label, got {self.k8s_namespace!r}")
        for name in ("k8s_decode_deployment", "k8s_prefill_deployment", "k8s_workers_deployment"):
            if name == "k8s_workers_deployment" and not self.k8s_workers_deployment:
                continue
            if not _DNS_SUBDOMAIN.fullmatch(getattr(self, name)):
                raise ValueError(
                    f"{name} must be a Deployment name (DNS-1123 subdomain), "
                    f"got {getattr(self, name)!r}"
                )
        if self.k8s_api_url and not self.k8s_api_url.startswith(("http://", "https://")):
            raise ValueError(f"k8s_api_url must be an http(s) URL, got {self.k8s_api_url!r}")
        if self.k8s_timeout_s <= 0:
            raise ValueError(f"k8s_timeout_s must be > 0, got {self.k8s_timeout_s}")


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannerConfig:
    namespace: str = field(default="default", metadata=doc("cluster namespace"))
    nats_url: str = field(default="nats://127.0.0.1:4222", metadata=doc("NATS server URL"))
    etcd_url: str = field(default="http://127.0.0.1:2379", metadata=doc("etcd URL"))
    planner_id: str = field(default="", metadata=doc("instance id (default: host-pid-random)"))
    mode: str = field(
        default="load",
        metadata=doc("load: thresholds on the workers' reports; sla: size pools from demand"),
    )
    connector: str = field(
        default="dry-run",
        metadata=doc(
            "what a decision does: dry-run (log it), local (publish ScaleCommand for baton up), "
            "kubernetes (set the worker Deployments' replicas; needs baton[k8s])"
        ),
    )
    interval_s: float = field(default=1.0, metadata=doc("seconds between decisions"))
    min_decode_workers: int = field(default=1, metadata=doc("fewest decode workers"))
    max_decode_workers: int = field(default=8, metadata=doc("most decode workers"))
    min_prefill_workers: int = field(default=0, metadata=doc("fewest prefill workers"))
    max_prefill_workers: int = field(
        default=0, metadata=doc("most prefill workers (0 with min 0: prefill is not planned)")
    )
    max_total_workers: int = field(
        default=0,
        metadata=doc(
            "most decode and prefill workers together (0: only the per-pool limits); a pool "
            "short of workers at this total gets one by a role switch or not at all"
        ),
    )
    min_total_workers: int = field(
        default=0,
        metadata=doc(
            "fewest decode and prefill workers together (0: only the per-pool limits); with "
            "--max-total-workers the same, the total is fixed and only role switches move "
            "capacity: an idle pool keeps its workers until the other asks for one"
        ),
    )
    role_switching: bool = field(
        default=True,
        metadata=doc(
            "when one pool wants a worker and the other can spare one, switch a worker's "
            "role (prefill <-> decode, about a second) rather than start a process (with "
            "the kubernetes connector only when --k8s-workers-deployment names one "
            "Deployment for both roles: a switched pod would stay in its role's Deployment)"
        ),
    )
    switch_timeout_s: float = field(
        default=5.0, metadata=doc("longest wait for a worker's answer to a role switch")
    )
    max_wait_fraction: float = field(
        default=0.5,
        metadata=doc(
            "load mode, over: predicted wait past this fraction of what admission allows "
            "(--slo-admit-fraction of the TTFT objective); sla mode: the prefill window, "
            "this fraction of the TTFT objective"
        ),
    )
    max_waiting: float = field(default=4.0, metadata=doc("over: queued requests per worker"))
    max_kv_usage: float = field(default=0.85, metadata=doc("over: KV cache usage per worker"))
    max_batch_fraction: float = field(
        default=0.9, metadata=doc("over: running sequences over the batch capacity")
    )
    max_prefill_busy: float = field(
        default=0.8,
        metadata=doc(
            "over: seconds of prefill arriving a second per prefill worker (prompt tokens "
            "arriving times their measured cost; with no prefill worker and a TPOT objective, "
            "the decode workers' own prefill)"
        ),
    )
    max_shed_fraction: float = field(
        default=0.02,
        metadata=doc(
            "over: the share of requests the frontends shed (429) lately; a pool over it "
            "steps up to its size times demand over what is served, in one action"
        ),
    )
    down_fraction: float = field(
        default=0.5,
        metadata=doc("under: one worker fewer would stay below this fraction of every limit"),
    )
    up_intervals: int = field(default=3, metadata=doc("intervals over in a row before adding"))
    down_intervals: int = field(
        default=10, metadata=doc("intervals under in a row before removing")
    )
    up_cooldown_s: float = field(
        default=10.0, metadata=doc("no increase this soon after an action")
    )
    down_cooldown_s: float = field(
        default=30.0, metadata=doc("no decrease this soon after an action")
    )
    settle_timeout_s: float = field(
        default=60.0, metadata=doc("longest wait for the pool to reach a new target")
    )
    target_utilization: float = field(
        default=0.7, metadata=doc("sla: the share of a worker's capacity to plan for")
    )
    horizon_s: float = field(default=10.0, metadata=doc("sla: how far ahead the trend is followed"))
    trend_window: int = field(default=10, metadata=doc("sla: intervals the trend is fitted over"))
    report_stale_s: float = field(
        default=1.0, metadata=doc("a worker's load report older than this is ignored")
    )
    slo: SLOConfig = field(default_factory=SLOConfig)  # the TTFT and TPOT objectives
    host: str = field(default="127.0.0.1", metadata=doc("HTTP address (health, metrics)"))
    port: int = field(default=0, metadata=doc("HTTP port (0 picks a free one)"))
    log_level: str = field(default="info", metadata=doc("logging level"))
    security: ClusterSecurity = field(default_factory=ClusterSecurity)  # NATS and etcd
    k8s: KubernetesConfig = field(default_factory=KubernetesConfig)  # --connector kubernetes

    def __post_init__(self) -> None:
        check_token(self.namespace, "namespace")
        if self.planner_id:
            check_token(self.planner_id, "planner_id")
        modes = [m.value for m in Mode]
        if self.mode not in modes:
            raise ValueError(f"mode must be one of {modes}, got {self.mode!r}")
        if self.connector not in CONNECTORS:
            raise ValueError(f"connector must be one of {list(CONNECTORS)}, got {self.connector!r}")
        if self.interval_s <= 0 or self.report_stale_s <= 0:
            raise ValueError(
                f"interval_s and report_stale_s must be > 0, "
                f"got {self.interval_s} and {self.report_stale_s}"
            )
        if self.switch_timeout_s <= 0:
            raise ValueError(f"switch_timeout_s must be > 0, got {self.switch_timeout_s}")
        if self.max_total_workers < 0 or self.min_total_workers < 0:
            raise ValueError(
                f"max_total_workers and min_total_workers must be >= 0, "
                f"got {self.max_total_workers} and {self.min_total_workers}"
            )
        if self.max_total_workers and self.min_total_workers > self.max_total_workers:
            raise ValueError(
                f"min_total_workers must be <= max_total_workers ({self.max_total_workers}), "
                f"got {self.min_total_workers}"
            )
        self.policy()  # raises ValueError naming a bad setting
        num_min = sum(pool.min_replicas for pool in self.limits().values())
        if self.max_total_workers and self.max_total_workers < num_min:
            raise ValueError(
                f"max_total_workers must be 0 or >= the pools' minimums ({num_min}), "
                f"got {self.max_total_workers}"
            )

    @property
    def switches_roles(self) -> bool:
        """Role switching, unless Kubernetes runs each pool as its own Deployment: a switched
        pod would stay in its Deployment, whose replicas would then no longer say what serves
        as what. With one Deployment for both roles (``k8s_workers_deployment``) the replicas
        are the total and roles are the planner's to set."""
        if self.connector == "kubernetes":
            return self.role_switching and bool(self.k8s.k8s_workers_deployment)
        return self.role_switching

    def policy(self) -> PolicyConfig:
        return PolicyConfig(
            mode=Mode(self.mode),
            ttft_s=self.slo.ttft_s,
            tpot_s=self.slo.tpot_s,
            admit_fraction=self.slo.slo_admit_fraction,
            thresholds=Thresholds(
                max_wait_fraction=self.max_wait_fraction,
                max_waiting=self.max_waiting,
                max_kv_usage=self.max_kv_usage,
                max_batch_fraction=self.max_batch_fraction,
                max_prefill_busy=self.max_prefill_busy,
                max_shed_fraction=self.max_shed_fraction,
                down_fraction=self.down_fraction,
            ),
            up_intervals=self.up_intervals,
            down_intervals=self.down_intervals,
            up_cooldown_s=self.up_cooldown_s,
            down_cooldown_s=self.down_cooldown_s,
            settle_timeout_s=self.settle_timeout_s,
            target_utilization=self.target_utilization,
            horizon_s=self.horizon_s,
            trend_window=self.trend_window,
        )

    def limits(self) -> dict[Role, Limits]:
        """The pools it plans, with their limits (prefill only if it may have a worker)."""
        pools = {Role.DECODE: Limits(self.min_decode_workers, self.max_decode_workers)}
        if self.max_prefill_workers > 0:
            pools[Role.PREFILL] = Limits(self.min_prefill_workers, self.max_prefill_workers)
        elif self.min_prefill_workers > 0:
            raise ValueError(
                f"min_prefill_workers is {self.min_prefill_workers} but max_prefill_workers is 0"
            )
        return pools
