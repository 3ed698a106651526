"""The router's Prometheus metrics, in a registry of its own (no module-level state)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.routing.router import Router

_DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2)


class RouterMetrics:
    def __init__(self, router: Router) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "baton_router_decisions",
            "routing decisions by pool (decode, or prefill when remote) and mode",
            ["pool", "mode"],
            registry=self.registry,
        )
        self.prefill_placements = Counter(
            "baton_router_prefill_placement",
            "where each request's prefill was placed: local (its decode or aggregated "
            "worker) or remote (a prefill worker)",
            ["where"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "baton_router_decision_seconds",
            "time to answer one RouteRequest",
            buckets=_DECISION_BUCKETS,
            registry=self.registry,
        )
        self.resyncs = Counter(
            "baton_router_resyncs", "index resyncs after lost KV events", registry=self.registry
        )
        hit = Gauge(
            "baton_router_overlap_hit_rate",
            "cached prompt blocks on the chosen worker / prompt blocks, over all decisions",
            registry=self.registry,
        )
        hit.set_function(lambda: router.stats.hit_rate)
        entries = Gauge(
            "baton_router_index_entries",
            "(block, worker) entries in the index",
            registry=self.registry,
        )
        entries.set_function(lambda: router.index.num_entries)
        self.worker_load = Gauge(
            "baton_router_worker_kv_usage",
            "KV usage each worker last reported",
            ["worker"],
            registry=self.registry,
        )
        self.worker_decisions = Counter(
            "baton_router_worker_decisions",
            "decisions that chose each worker (decode, or prefill when remote)",
            ["worker"],
            registry=self.registry,
        )
