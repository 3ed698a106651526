"""The router's Prometheus metrics, in a registry of its own (no module-level state)."""

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from shared.routing.router import Router

# (name without _total, help, value): counters the router's pure parts keep themselves.
CounterSample = tuple[str, str, float]

_DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2)


class _CountersRead(Collector):
    """Counters read when scraped from the plain ints the index and the service keep (no
    cost on the routing path); exported with Prometheus' counter type (``_total``)."""

    def __init__(self, read: Callable[[], list[CounterSample]]) -> None:
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, text, value in self._read():
            yield CounterMetricFamily(name, text, value=value)


def index_counters(router: Router) -> list[CounterSample]:
    index, stats = router.index.stats, router.stats
    return [
        ("baton_router_kv_event_batches", "KV event batches applied", index.num_batches),
        ("baton_router_kv_event_duplicates", "KV event batches seen twice", index.num_duplicates),
        ("baton_router_kv_event_gaps", "gaps in a worker's KV event numbering", index.num_gaps),
        ("baton_router_kv_event_resets", "workers whose numbering restarted", index.num_resets),
        (
            "baton_router_index_evicted_blocks",
            "blocks dropped to keep the index under its entry bound",
            index.num_evicted_blocks,
        ),
        ("baton_router_index_compactions", "index compactions", index.num_compactions),
        (
            "baton_router_worker_choices",
            "workers chosen (one per pool a request is placed in: decode, prefill when remote)",
            stats.num_decisions,
        ),
        (
            "baton_router_overloaded_decisions",
            "decisions where every candidate was over its load cap",
            stats.num_overloaded_decisions,
        ),
    ]


class RouterMetrics:
    def __init__(
        self, router: Router, counters: Callable[[], list[CounterSample]] | None = None
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(
            _CountersRead(lambda: index_counters(router) + (counters() if counters else []))
        )
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
            "(block, worker) entries of the workers the index tracks",
            registry=self.registry,
        )
        entries.set_function(lambda: router.index.num_live_entries)
        held = Gauge(
            "baton_router_index_held_entries",
            "(block, worker) entries in memory: the tracked ones and those of gone or resynced"
            " workers not yet reclaimed",
            registry=self.registry,
        )
        held.set_function(lambda: router.index.num_entries)
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

    def gauge(self, name: str, text: str, read: Callable[[], float]) -> None:
        """A gauge read when scraped."""
        Gauge(name, text, registry=self.registry).set_function(read)
