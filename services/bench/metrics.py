"""Percentiles, per-stage summaries and per-second series of outcomes (pure).

Every request is counted in the stage, and in the second, in which it was due: offered,
good, shed and errors of one second are the fate of that second's arrivals, so "good of
offered" compares like with like even when responses come later.
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.bench.outcome import ERROR_KINDS, Kind, Objectives, Outcome, Verdict, verdict


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation, as numpy's default;
    NaN for no values."""
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(values: Sequence[float], q: float) -> float:
    return percentile(values, q) * 1000


@dataclass(frozen=True, slots=True)
class Summary:
    """One stage (or the total) of a run. Rates divide by the stage's scheduled length."""

    label: str
    start_s: float
    duration_s: float
    num_offered: int
    offered_rps: float
    num_completed: int
    num_good: int
    good_rps: float
    good_pct: float  # of offered, less those aborted by a stop (they had no chance to end)
    num_slo_miss: int
    num_shed: int
    num_errors: int
    num_aborted: int
    shed_latency_p50_ms: float
    shed_latency_p99_ms: float
    # Sheds that came on a connection opened for the request (a client's pool growing),
    # and the p99 of the others, on connections kept alive: a new connection waits for the
    # server to accept it, and a busy server accepts late. Only the lean http:// client
    # knows which is which: through aiohttp's (https://) every shed counts as kept alive.
    num_shed_new_connection: int
    shed_latency_p99_kept_alive_ms: float
    retry_after_p50_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    latency_p50_ms: float
    latency_p99_ms: float
    output_tokens_per_s: float
    send_lag_p99_ms: float  # sent after due: the client's own lateness
    cached_prompt_pct: float  # of completed requests' prompt tokens, per the server's usage
    errors_by_kind: dict[str, int]


def summarize(
    outcomes: Iterable[Outcome],
    objectives: Objectives,
    *,
    label: str,
    start_s: float,
    duration_s: float,
) -> Summary:
    """The summary of the outcomes due in one stage of ``duration_s`` seconds."""
    rows = list(outcomes)
    verdicts = [verdict(o, objectives) for o in rows]
    completed = [o for o in rows if o.kind is Kind.OK]
    shed = [o for o in rows if o.kind is Kind.SHED]
    errors: dict[str, int] = {}
    for o in rows:
        if o.kind in ERROR_KINDS:
            errors[o.kind.value] = errors.get(o.kind.value, 0) + 1
    num_good = verdicts.count(Verdict.GOOD)
    num_ended = len(rows) - verdicts.count(Verdict.ABORTED)
    num_prompt = sum(o.num_prompt_tokens for o in completed)
    num_cached = sum(o.num_cached_tokens for o in completed)
    per_s = 1 / duration_s if duration_s > 0 else math.nan
    return Summary(
        label=label,
        start_s=start_s,
        duration_s=duration_s,
        num_offered=len(rows),
        offered_rps=len(rows) * per_s,
        num_completed=len(completed),
        num_good=num_good,
        good_rps=num_good * per_s,
        good_pct=100 * num_good / num_ended if num_ended else math.nan,
        num_slo_miss=verdicts.count(Verdict.SLO_MISS),
        num_shed=len(shed),
        num_errors=sum(errors.values()),
        num_aborted=verdicts.count(Verdict.ABORTED),
        shed_latency_p50_ms=_ms([o.latency_s for o in shed], 50),
        shed_latency_p99_ms=_ms([o.latency_s for o in shed], 99),
        num_shed_new_connection=sum(1 for o in shed if o.new_connection),
        shed_latency_p99_kept_alive_ms=_ms([o.latency_s for o in shed if not o.new_connection], 99),
        retry_after_p50_s=percentile([o.retry_after_s for o in shed], 50),
        ttft_p50_ms=_ms([o.ttft_s for o in completed], 50),
        ttft_p99_ms=_ms([o.ttft_s for o in completed], 99),
        tpot_p50_ms=_ms([o.tpot_s for o in completed], 50),
        tpot_p99_ms=_ms([o.tpot_s for o in completed], 99),
        latency_p50_ms=_ms([o.latency_s for o in completed], 50),
        latency_p99_ms=_ms([o.latency_s for o in completed], 99),
        output_tokens_per_s=sum(o.num_output_tokens for o in completed) * per_s,
        send_lag_p99_ms=_ms([o.sent_s - o.due_s for o in rows], 99),
        cached_prompt_pct=100 * num_cached / num_prompt if num_prompt else math.nan,
        errors_by_kind=errors,
    )


def time_series(
    outcomes: Iterable[Outcome], objectives: Objectives, num_seconds: int
) -> dict[str, list[float]]:
    """Per second of due time: counts and TTFT/TPOT percentiles (ms; NaN when none)."""
    n = max(0, num_seconds)
    counts = {name: [0.0] * n for name in ("offered", "good", "slo_miss", "shed", "errors")}
    ttft: list[list[float]] = [[] for _ in range(n)]
    tpot: list[list[float]] = [[] for _ in range(n)]
    for o in outcomes:
        second = int(o.due_s)
        if not 0 <= second < n:
            continue
        counts["offered"][second] += 1
        match verdict(o, objectives):
            case Verdict.GOOD:
                counts["good"][second] += 1
            case Verdict.SLO_MISS:
                counts["slo_miss"][second] += 1
            case Verdict.SHED:
                counts["shed"][second] += 1
            case Verdict.ERROR:
                counts["errors"][second] += 1
            case Verdict.ABORTED:
                pass
        if o.kind is Kind.OK:
            ttft[second].append(o.ttft_s)
            tpot[second].append(o.tpot_s)
    series: dict[str, list[float]] = {"t_s": [float(s) for s in range(n)], **counts}
    for name, values in (("ttft", ttft), ("tpot", tpot)):
        for q in (50, 99):
            series[f"{name}_p{q}_ms"] = [_ms(v, q) for v in values]
    return series


def merge_cpu_seconds(per_process: Iterable[Sequence[float]]) -> list[float]:
    """Element-wise sum of per-process CPU seconds per second of the run."""
    total: list[float] = []
    for series in per_process:
        if len(series) > len(total):
            total.extend([0.0] * (len(series) - len(total)))
        for i, value in enumerate(series):
            total[i] += value
    return total
