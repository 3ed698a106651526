"""baton-bench classification, percentiles, summaries and series (pure)."""

import math

import pytest

from services.bench.metrics import merge_cpu_seconds, percentile, summarize, time_series
from services.bench.outcome import (
    Kind,
    Objectives,
    Outcome,
    Verdict,
    time_per_output_token,
    verdict,
)

OBJECTIVES = Objectives.from_ms(ttft_ms=500, tpot_ms=50)


def make_outcome(
    kind=Kind.OK, *, ttft_ms=100.0, tpot_ms=20.0, due_s=0.0, stage=0, latency_ms=1000.0, **kw
):
    return Outcome(
        index=kw.pop("index", 0),
        stage=stage,
        due_s=due_s,
        sent_s=due_s + kw.pop("lag_s", 0.001),
        kind=kind,
        status=kw.pop("status", 200 if kind is Kind.OK else 0),
        ttft_s=ttft_ms / 1000,
        tpot_s=tpot_ms / 1000,
        latency_s=latency_ms / 1000,
        num_output_tokens=kw.pop("num_output_tokens", 10),
        **kw,
    )


def test_time_per_output_token_spans_first_to_last_token():
    assert time_per_output_token(1.0, 1.9, 10) == pytest.approx(0.1)
    assert math.isnan(time_per_output_token(1.0, 1.0, 1))


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (make_outcome(), Verdict.GOOD),
        (make_outcome(ttft_ms=500.0), Verdict.GOOD),  # at the objective is within it
        (make_outcome(ttft_ms=501.0), Verdict.SLO_MISS),
        (make_outcome(tpot_ms=51.0), Verdict.SLO_MISS),
        (make_outcome(tpot_ms=math.nan, num_output_tokens=1), Verdict.GOOD),
        (make_outcome(ttft_ms=math.nan), Verdict.SLO_MISS),  # no token seen: not good
        (make_outcome(Kind.SHED, status=429), Verdict.SHED),
        (make_outcome(Kind.HTTP_ERROR, status=500), Verdict.ERROR),
        (make_outcome(Kind.SSE_ERROR, status=200), Verdict.ERROR),
        (make_outcome(Kind.TIMEOUT), Verdict.ERROR),
        (make_outcome(Kind.CONNECTION_ERROR), Verdict.ERROR),
        (make_outcome(Kind.INCOMPLETE), Verdict.ERROR),
        (make_outcome(Kind.ABORTED), Verdict.ABORTED),
    ],
)
def test_verdict_classifies_outcomes_against_the_objectives(outcome, expected):
    assert verdict(outcome, OBJECTIVES) is expected


def test_without_objectives_every_completed_request_is_good():
    slow = make_outcome(ttft_ms=60_000.0, tpot_ms=900.0)
    assert verdict(slow, Objectives()) is Verdict.GOOD


def test_percentile_interpolates_linearly_like_numpy():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0, math.nan, 1.0], 50) == 2.0
    assert math.isnan(percentile([], 50))


def test_summarize_counts_rates_and_percentiles_of_a_stage():
    outcomes = [
        *(make_outcome(ttft_ms=float(t)) for t in range(100, 200, 10)),  # 10 good
        make_outcome(ttft_ms=900.0),  # missed TTFT
        make_outcome(Kind.SHED, status=429, latency_ms=2.0, retry_after_s=1.0),
        make_outcome(Kind.SHED, status=429, latency_ms=4.0, retry_after_s=1.0, new_connection=True),
        make_outcome(Kind.HTTP_ERROR, status=500),
        make_outcome(Kind.ABORTED),
    ]
    s = summarize(outcomes, OBJECTIVES, label="10 req/s", start_s=0.0, duration_s=5.0)
    assert (s.num_offered, s.num_completed, s.num_good, s.num_slo_miss) == (15, 11, 10, 1)
    assert (s.num_shed, s.num_errors, s.num_aborted) == (2, 1, 1)
    assert s.offered_rps == 3.0
    assert s.good_rps == 2.0
    assert s.good_pct == pytest.approx(100 * 10 / 14)  # aborted ones had no chance
    assert s.shed_latency_p50_ms == pytest.approx(3.0)
    assert s.num_shed_new_connection == 1
    assert s.shed_latency_p99_kept_alive_ms == pytest.approx(2.0)  # the new one left out
    assert s.retry_after_p50_s == 1.0
    assert s.ttft_p50_ms == pytest.approx(150.0)
    assert s.tpot_p99_ms == pytest.approx(20.0)
    assert s.errors_by_kind == {"http_error": 1}
    assert s.output_tokens_per_s == pytest.approx(11 * 10 / 5)


def test_summarize_of_nothing_has_no_percentiles():
    s = summarize([], OBJECTIVES, label="0 req/s", start_s=0.0, duration_s=1.0)
    assert s.num_offered == 0
    assert math.isnan(s.ttft_p50_ms)
    assert math.isnan(s.good_pct)


def test_time_series_buckets_by_due_second():
    outcomes = [
        make_outcome(due_s=0.2, ttft_ms=100.0),
        make_outcome(due_s=0.9, ttft_ms=300.0),
        make_outcome(Kind.SHED, due_s=1.5),
        make_outcome(due_s=2.1, ttft_ms=700.0),
        make_outcome(Kind.TIMEOUT, due_s=2.2),
        make_outcome(due_s=7.0),  # past the end: dropped
    ]
    series = time_series(outcomes, OBJECTIVES, 3)
    assert series["t_s"] == [0.0, 1.0, 2.0]
    assert series["offered"] == [2, 1, 2]
    assert series["good"] == [2, 0, 0]
    assert series["slo_miss"] == [0, 0, 1]
    assert series["shed"] == [0, 1, 0]
    assert series["errors"] == [0, 0, 1]
    assert series["ttft_p50_ms"][0] == pytest.approx(200.0)
    assert math.isnan(series["ttft_p50_ms"][1])


def test_cpu_seconds_of_client_processes_add_up_per_second():
    assert merge_cpu_seconds([[0.5, 0.25], [0.25, 0.5, 1.0]]) == [0.75, 0.75, 1.0]
