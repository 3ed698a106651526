"""One request as the client saw it, and its classification against the objectives (pure)."""

import math
from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    """How a request ended."""

    OK = "ok"  # 200 and the stream finished with [DONE]
    SHED = "shed"  # refused with a shed status (429 by default)
    HTTP_ERROR = "http_error"  # any other status
    CONNECTION_ERROR = "connection_error"
    TIMEOUT = "timeout"  # past --request-timeout-s
    SSE_ERROR = "sse_error"  # an error event mid-stream
    INCOMPLETE = "incomplete"  # the stream ended without [DONE]
    ABORTED = "aborted"  # still in flight when the run was stopped


ERROR_KINDS = frozenset(
    {Kind.HTTP_ERROR, Kind.CONNECTION_ERROR, Kind.TIMEOUT, Kind.SSE_ERROR, Kind.INCOMPLETE}
)


class Verdict(StrEnum):
    GOOD = "good"
    SLO_MISS = "slo_miss"  # completed, but over an objective
    SHED = "shed"
    ERROR = "error"
    ABORTED = "aborted"


@dataclass(slots=True)
class Outcome:
    """Times are seconds: ``due_s`` and ``sent_s`` from the run's start, the others from the
    send. ``latency_s`` ends at the last byte (or at the refusal, for a shed request)."""

    index: int
    stage: int
    due_s: float
    priority: int | None = None
    sent_s: float = math.nan
    kind: Kind = Kind.ABORTED
    status: int = 0
    ttft_s: float = math.nan
    tpot_s: float = math.nan
    latency_s: float = math.nan
    num_output_tokens: int = 0
    num_prompt_tokens: int = 0  # as the server counted them (usage)
    num_cached_tokens: int = 0  # of which served from its prefix cache
    retry_after_s: float = math.nan
    error: str = ""
    # Sent on a connection opened for it, not on an idle one kept alive (the lean http://
    # client knows; through aiohttp's client it stays False).
    new_connection: bool = False


@dataclass(frozen=True, slots=True)
class Objectives:
    """Client-side service level objectives; ``None``: no objective."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    @classmethod
    def from_ms(cls, ttft_ms: float | None, tpot_ms: float | None) -> "Objectives":
        return cls(
            None if ttft_ms is None else ttft_ms / 1000, None if tpot_ms is None else tpot_ms / 1000
        )


def time_per_output_token(first_s: float, last_s: float, num_tokens: int) -> float:
    """``(last - first) / (tokens - 1)``; NaN with fewer than two tokens."""
    return (last_s - first_s) / (num_tokens - 1) if num_tokens > 1 else math.nan


def verdict(outcome: Outcome, objectives: Objectives) -> Verdict:
    """Good: completed within both objectives (one token has no TPOT, so cannot miss it)."""
    if outcome.kind is Kind.SHED:
        return Verdict.SHED
    if outcome.kind is Kind.ABORTED:
        return Verdict.ABORTED
    if outcome.kind is not Kind.OK:
        return Verdict.ERROR
    if objectives.ttft_s is not None and not outcome.ttft_s <= objectives.ttft_s:
        return Verdict.SLO_MISS
    if (
        objectives.tpot_s is not None
        and not math.isnan(outcome.tpot_s)
        and outcome.tpot_s > objectives.tpot_s
    ):
        return Verdict.SLO_MISS
    return Verdict.GOOD
