"""The frontend's Prometheus metrics, in a registry of its own (no module-level state)."""

import functools
import time
from collections.abc import Iterable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from services.frontend.goodput import GoodputWindow, Outcome
from shared.streams import StreamDemux

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


_Labelled = TypeVar("_Labelled", Counter, Gauge, Histogram)


def _window_count(window: GoodputWindow, outcome: Outcome) -> float:
    return window.counts(time.monotonic())[outcome]


class _OutputTokens(Collector):
    def __init__(self, metrics: "FrontendMetrics") -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(
            "baton_frontend_output_tokens",
            "tokens generated",
            value=self._metrics.num_output_tokens,
        )


class _DroppedChunks(Collector):
    """The demux's counts of token chunks it dropped, read when scraped (the token path adds
    to plain ints)."""

    def __init__(self, demux: StreamDemux) -> None:
        self._demux = demux

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(
            "baton_frontend_orphan_chunks",
            "token chunks for no stream open here (its client left, it ended, or they were "
            "sent for an attempt it abandoned); dropped",
            value=self._demux.num_orphan_chunks,
        )
        yield CounterMetricFamily(
            "baton_frontend_stale_chunks",
            "token chunks from a worker the stream no longer follows (it moved to another); "
            "dropped",
            value=self._demux.num_stale_chunks,
        )


class FrontendMetrics:
    def __init__(self, goodput_window_s: float = 60.0) -> None:
        self.registry = CollectorRegistry()
        self._goodput_window_s = goodput_window_s
        self._windows: dict[str, GoodputWindow] = {}
        self._children: dict[tuple[int, tuple[str, ...]], object] = {}
        self.goodput = Counter(
            "baton_frontend_goodput_requests",
            "completion requests by outcome: good (finished within the objectives), slo_miss "
            "(finished late), shed (answered 429 early, or shed before it started), error",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.goodput_ratio = Gauge(
            "baton_frontend_goodput_ratio",
            "good requests over all outcomes in the last goodput_window_s seconds",
            ["model"],
            registry=self.registry,
        )
        self.goodput_window = Gauge(
            "baton_frontend_goodput_window_requests",
            "requests by outcome in the last goodput_window_s seconds (the ratio's terms)",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.shed_latency = Histogram(
            "baton_frontend_shed_seconds",
            "time from a request's arrival to its 429, by where it was shed: frontend (from "
            "load reports, before any work), sending (from them again, about to send it), "
            "worker (its admission), waiting (its deadline passed in a queue)",
            ["stage"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0),
            registry=self.registry,
        )
        self.requests = Counter(
            "baton_frontend_requests",
            "HTTP completion requests by model, endpoint and final status",
            ["model", "endpoint", "status"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "baton_frontend_in_flight_requests",
            "completion requests being served",
            registry=self.registry,
        )
        # One series a process (the merged /metrics would add them up otherwise).
        self.loop_lag = Gauge(
            "baton_frontend_loop_lag_seconds",
            "how late this process's event loop runs, smoothed over about 100 ms; past "
            "--max-loop-lag-ms, with a TTFT objective, new requests are shed unread",
            ["pid"],
            registry=self.registry,
        )
        self.lag_shed_fraction = Gauge(
            "baton_frontend_lag_shed_fraction",
            "the fraction of new completion requests this process sheds unread for its loop's "
            "lag (with a TTFT objective): raised while the lag is past --max-loop-lag-ms, "
            "lowered while it is under",
            ["pid"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "baton_frontend_time_to_first_token_seconds",
            "time from request arrival to the first token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft_phase = Histogram(
            "baton_frontend_ttft_phase_seconds",
            "time to first token by phase, as the workers measured it: queue, prefill, "
            "transfer (KV handoff), and the rest (routing, first decode step, network)",
            ["phase"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.remote_prefills = Counter(
            "baton_frontend_remote_prefills",
            "requests whose prompt a prefill worker computed",
            registry=self.registry,
        )
        self.overload_sheds = Counter(
            "baton_frontend_overload_sheds",
            "requests answered 429 before being read, while this frontend's loop lagged, by "
            "where: by their connection (the plain case) or by the handler",
            ["where"],
            registry=self.registry,
        )
        for where in ("connection", "handler"):  # both series from the start, at zero
            self.overload_sheds.labels(where)
        self.connection_checks = Counter(
            "baton_frontend_connection_capacity_sheds",
            "requests the early check (stage frontend of baton_frontend_shed_seconds) shed "
            "from their connection's bytes, before aiohttp parsed them",
            registry=self.registry,
        )
        self.migrations = Counter(
            "baton_frontend_migrations",
            "streams moved to another worker after theirs died or dropped them",
            registry=self.registry,
        )
        self.late_acceptances = Counter(
            "baton_frontend_late_acceptances",
            "requests kept on their worker: its acceptance came after the admission "
            "timeout, their first tokens before it",
            registry=self.registry,
        )
        self.silent_workers = Counter(
            "baton_frontend_silent_workers",
            "workers found dead: quiet, and no longer subscribed to their inbox on the bus",
            registry=self.registry,
        )
        self.route_fallbacks = Counter(
            "baton_frontend_route_fallbacks",
            "requests placed by load because no router answered in time",
            registry=self.registry,
        )
        self.tpot = Histogram(
            "baton_frontend_time_per_output_token_seconds",
            "per request: time from its first token to its last, over the tokens after the "
            "first (observed once, when it ends)",
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "baton_frontend_prompt_tokens", "prompt tokens received", registry=self.registry
        )
        # Added to on the token path as a plain int (no lock, no label lookup per chunk);
        # read when scraped.
        self.num_output_tokens = 0
        self.registry.register(_OutputTokens(self))

    def child(self, metric: _Labelled, *values: str) -> _Labelled:
        """``metric.labels(*values)``, kept: prometheus_client checks and locks on every
        ``labels`` call, and at thousands of sheds a second that is a visible share of each
        answer. Every label value here comes from a bounded set (models in the registry,
        endpoints, statuses, stages), so the cache is bounded too."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found  # type: ignore[return-value]  # stored as the metric's own child

    def record_outcome(self, model: str, outcome: Outcome) -> None:
        """Count one finished request of a known model (names come from the model registry,
        never from the client, so the label set stays bounded)."""
        self.child(self.goodput, model, outcome.value).inc()
        window = self._windows.get(model)
        if window is None:
            window = self._windows[model] = GoodputWindow(self._goodput_window_s)
            self.goodput_ratio.labels(model).set_function(lambda: window.ratio(time.monotonic()))
            for each in Outcome:
                self.goodput_window.labels(model, each.value).set_function(
                    functools.partial(_window_count, window, each)
                )
        window.record(outcome, time.monotonic())

    def watch_demux(self, demux: StreamDemux) -> None:
        """Export the token chunks ``demux`` drops (call once, with this process's demux)."""
        self.registry.register(_DroppedChunks(demux))
