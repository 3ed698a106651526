"""One request's objectives and priority: the server's, tightened by the request (pure).

A request may set ``priority`` (an int, lower served first and shed last; or the header
``X-Baton-Priority``: an int or ``high``/``normal``/``low`` = -1/0/1) and tighten the
time-to-first-token and time-per-output-token objectives with the body fields
``slo_ttft_ms``/``slo_tpot_ms`` or the headers ``X-Baton-SLO-TTFT-Ms``/``X-Baton-SLO-TPOT-Ms``.
A request's objective looser than the server's is ignored: objectives are what the operator
promised, and a client may only ask for better. With no objective at all a request is never
shed; it waits its turn.
"""

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

from shared.errors import InvalidRequest

PRIORITY_NAMES = {"high": -1, "normal": 0, "low": 1}
MAX_ABS_PRIORITY = 1_000_000


@dataclass(frozen=True, slots=True)
class RequestObjectives:
    """Objectives in seconds (None: none) and the priority of one request."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    priority: int = 0

    def is_good(self, ttft_s: float, tpot_s: float | None) -> bool:
        """Whether a finished request met both objectives (``tpot_s`` None: one token)."""
        if self.ttft_s is not None and ttft_s > self.ttft_s:
            return False
        return self.tpot_s is None or tpot_s is None or tpot_s <= self.tpot_s


def _tightest(server_s: float | None, request_ms: float | None, what: str) -> float | None:
    if request_ms is None:
        return server_s
    if not request_ms > 0:
        raise InvalidRequest(f"{what} must be > 0 ms, got {request_ms}")
    request_s = request_ms / 1000.0
    return request_s if server_s is None else min(server_s, request_s)


def _header_float(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):  # "inf" and "nan" parse, but are no objective
        raise InvalidRequest(f"header {name} must be a number of milliseconds, got {raw!r}")
    return value


def is_high_priority_header(value: str) -> bool:
    """Whether an ``X-Baton-Priority`` value asks for more than normal priority (``high`` or
    a negative number), read before the body and without validating it: such a request is
    never shed for the frontend's own lag (its worker decides)."""
    value = value.strip().lower()
    return value == "high" or value.startswith("-")


def _priority(body_priority: int, headers: Mapping[str, str]) -> int:
    raw = headers.get("X-Baton-Priority")
    priority = body_priority
    if raw is not None:
        name = raw.strip().lower()
        if name in PRIORITY_NAMES:
            priority = PRIORITY_NAMES[name]
        else:
            try:
                priority = int(name)
            except ValueError:
                raise InvalidRequest(
                    "header X-Baton-Priority must be an integer or high, normal, low"
                ) from None
    if abs(priority) > MAX_ABS_PRIORITY:
        raise InvalidRequest(f"priority must be within ±{MAX_ABS_PRIORITY}, got {priority}")
    return priority


def request_objectives(
    *,
    server_ttft_s: float | None,
    server_tpot_s: float | None,
    body_ttft_ms: float | None,
    body_tpot_ms: float | None,
    body_priority: int,
    headers: Mapping[str, str],
) -> RequestObjectives:
    """The objectives that apply; the tighter of body and header when both are given."""
    ttft = _tightest(server_ttft_s, body_ttft_ms, "slo_ttft_ms")
    ttft = _tightest(ttft, _header_float(headers, "X-Baton-SLO-TTFT-Ms"), "X-Baton-SLO-TTFT-Ms")
    tpot = _tightest(server_tpot_s, body_tpot_ms, "slo_tpot_ms")
    tpot = _tightest(tpot, _header_float(headers, "X-Baton-SLO-TPOT-Ms"), "X-Baton-SLO-TPOT-Ms")
    return _shared(ttft, tpot, _priority(body_priority, headers))


@functools.lru_cache(maxsize=256)
def _shared(ttft_s: float | None, tpot_s: float | None, priority: int) -> RequestObjectives:
    """One object for each combination in use (nearly every request has the server's), not
    one per request kept for its stream's life."""
    return RequestObjectives(ttft_s, tpot_s, priority)
