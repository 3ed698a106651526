"""Summing the metrics of several frontend processes into one exposition."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.frontend.metrics_merge import merge


def _registry(requests: int, in_flight: int, good: int, bad: int, latency: float) -> str:
    registry = CollectorRegistry()
    counter = Counter("baton_frontend_requests", "r", ["status"], registry=registry)
    counter.labels("ok").inc(requests)
    Gauge("baton_frontend_in_flight_requests", "g", registry=registry).set(in_flight)
    window = Gauge(
        "baton_frontend_goodput_window_requests", "w", ["model", "outcome"], registry=registry
    )
    window.labels("m", "good").set(good)
    window.labels("m", "error").set(bad)
    Gauge("baton_frontend_goodput_ratio", "ratio", ["model"], registry=registry).labels("m").set(
        good / (good + bad) if good + bad else 1.0
    )
    Histogram("baton_frontend_ttft_seconds", "h", buckets=(0.1, 1.0), registry=registry).observe(
        latency
    )
    return generate_latest(registry).decode()


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counters_gauges_and_histograms_add_up_and_the_ratio_is_recomputed():
    merged = _samples(
        merge([_registry(3, 2, good=9, bad=1, latency=0.05), _registry(4, 5, 1, 9, 0.5)])
    )
    assert merged["baton_frontend_requests_total", (("status", "ok"),)] == 7
    assert merged["baton_frontend_in_flight_requests", ()] == 7
    assert merged["baton_frontend_ttft_seconds_count", ()] == 2
    assert merged["baton_frontend_ttft_seconds_bucket", (("le", "0.1"),)] == 1
    assert merged["baton_frontend_ttft_seconds_bucket", (("le", "1.0"),)] == 2
    # (9 + 1) good of 20: not the mean of 0.9 and 0.1 by accident only.
    assert merged["baton_frontend_goodput_ratio", (("model", "m"),)] == 0.5
    merged = _samples(merge([_registry(1, 0, 3, 1, 0.05), _registry(1, 0, 0, 0, 0.5)]))
    assert merged["baton_frontend_goodput_ratio", (("model", "m"),)] == 0.75


def test_one_exposition_passes_through_unchanged_in_value():
    text = _registry(3, 2, 1, 1, 0.05)
    assert _samples(merge([text])) == _samples(text)
