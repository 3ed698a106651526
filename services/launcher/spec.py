"""What `LocalCluster` starts: the `ClusterSpec` (see cluster.py for what it does with it)."""

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterSpec:
    """What to start. Each ``*_args`` tuple is appended to that service's command line (a flag
    given twice: the last one wins); ``env`` is added to this process's environment for every
    child. The launcher passes each router ``--port`` and the frontend ``--host``/``--port`` so
    that it knows their URLs: do not override those.

    ``supervise``: once the cluster is ready, restart any process that exits (a service with
    its command line and log file, a server it started on its port), waiting
    ``restart_backoff_s`` before the first attempt, doubling up to ``restart_backoff_max_s``;
    a process that stayed up ``restart_reset_s`` starts again from ``restart_backoff_s``. Off,
    a process that exits stays dead (the e2e tests kill workers on purpose).

    ``secure``: the servers it starts require a random password (NATS user ``baton``, etcd
    ``root``) and TLS from a throwaway CA, all in a 0700 temp dir removed by stop(); every
    child gets them as ``BATON_NATS_*``/``BATON_ETCD_*`` (docs/security.md).

    ``planner``: also start ``baton-planner --connector local`` (with ``planner_args``) and
    follow its scale commands: start decode workers (``decode_args``) or retire them by
    SIGTERM (they drain), between 1 and ``max_workers`` (0: ``num_workers``), and prefill
    workers (``prefill_args``) between ``min_prefill_workers`` and ``max_prefill_workers``
    (0: ``num_prefill_workers``) when the cluster has a prefill pool, with at most
    ``max_total_workers`` and at least ``min_total_workers`` of both (0: no cap, no floor; at
    the cap the planner moves capacity by switching a worker's role); a worker counts in the
    pool
    of the role it is registered with now (the planner may switch it); see docs/planner.md.
    With it, ``num_standby_workers`` decode worker processes are kept started, imported and
    warm but unregistered (``standby.py``): a scale-up hands one its assignment and it serves
    within a few tenths of a second, instead of a cold start's seconds; another standby
    replaces it."""

    namespace: str = "default"
    nats_url: str = ""  # empty: start a nats-server on a free port
    etcd_url: str = ""  # empty: start an etcd on a free port
    secure: bool = False  # credentials and TLS for the servers it starts
    host: str = "127.0.0.1"  # the frontend's listen address
    port: int = 0  # the frontend's port; 0 picks a free one
    num_routers: int = 1
    num_prefill_workers: int = 0
    num_workers: int = 2  # decode workers
    num_frontends: int = 1  # frontend processes sharing the port (baton-frontend --procs)
    router_args: tuple[str, ...] = ()
    prefill_args: tuple[str, ...] = ()
    decode_args: tuple[str, ...] = ()
    frontend_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    log_dir: str = ""  # empty: children write to this process's stdout and stderr
    log_level: str = "info"
    ready_timeout_s: float = 60.0
    stop_timeout_s: float = 40.0  # per tier, after SIGTERM; then SIGKILL
    supervise: bool = False
    restart_backoff_s: float = 0.5
    restart_backoff_max_s: float = 10.0
    restart_reset_s: float = 30.0
    planner: bool = False
    max_workers: int = 0  # the planner's ceiling on decode workers (0: num_workers)
    max_prefill_workers: int = 0  # its ceiling on prefill workers (0: num_prefill_workers)
    min_prefill_workers: int = 1  # its floor (0: it may switch or retire them all)
    max_total_workers: int = 0  # its cap on decode + prefill workers (0: none)
    min_total_workers: int = 0  # its floor under them (0: none; = the cap: a fixed total)
    planner_args: tuple[str, ...] = ()
    num_standby_workers: int = 1  # with planner: warm decode processes kept for scale-ups

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.num_frontends < 1:
            raise ValueError(f"num_frontends must be >= 1, got {self.num_frontends}")
        if self.num_routers < 0 or self.num_prefill_workers < 0:
            raise ValueError(
                f"num_routers and num_prefill_workers must be >= 0, "
                f"got {self.num_routers} and {self.num_prefill_workers}"
            )
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not 0 < self.restart_backoff_s <= self.restart_backoff_max_s:
            raise ValueError(
                f"need 0 < restart_backoff_s <= restart_backoff_max_s, "
                f"got {self.restart_backoff_s} and {self.restart_backoff_max_s}"
            )
        if self.restart_reset_s < 0:
            raise ValueError(f"restart_reset_s must be >= 0, got {self.restart_reset_s}")
        if self.num_standby_workers < 0:
            raise ValueError(f"num_standby_workers must be >= 0, got {self.num_standby_workers}")
        if self.max_prefill_workers and self.max_prefill_workers < self.num_prefill_workers:
            raise ValueError(
                f"max_prefill_workers must be >= num_prefill_workers "
                f"({self.num_prefill_workers}), got {self.max_prefill_workers}"
            )
        if self.max_total_workers and self.min_total_workers > self.max_total_workers:
            raise ValueError(
                f"min_total_workers must be <= max_total_workers ({self.max_total_workers}), "
                f"got {self.min_total_workers}"
            )
        if min(self.min_prefill_workers, self.max_total_workers, self.min_total_workers) < 0:
            raise ValueError(
                f"min_prefill_workers, max_total_workers and min_total_workers must be >= 0, "
                f"got {self.min_prefill_workers}, {self.max_total_workers} and "
                f"{self.min_total_workers}"
            )
        if self.max_workers and self.max_workers < self.num_workers:
            raise ValueError(
                f"max_workers must be >= num_workers ({self.num_workers}), got {self.max_workers}"
            )
