"""Goodput as the server sees it: requests finished within their objectives, outside them,
and shed, per model, with a ratio over a sliding window (pure counting; the metrics module
exports it)."""

from collections import deque
from enum import Enum


class Outcome(Enum):
    GOOD = "good"  # finished within both objectives (or none were set)
    SLO_MISS = "slo_miss"  # finished, but late
    SHED = "shed"  # refused early (429) or shed before it started
    ERROR = "error"  # failed (an engine or worker error)


class GoodputWindow:
    """Outcomes of the last ``window_s`` seconds in one-second buckets."""

    def __init__(self, window_s: float = 60.0) -> None:
        if window_s < 1:
            raise ValueError(f"window_s must be >= 1, got {window_s}")
        self.window_s = window_s
        self._buckets: deque[tuple[int, dict[Outcome, int]]] = deque()

    def record(self, outcome: Outcome, now_s: float) -> None:
        second = int(now_s)
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append((second, dict.fromkeys(Outcome, 0)))
        self._buckets[-1][1][outcome] += 1
        self._expire(now_s)

    def counts(self, now_s: float) -> dict[Outcome, int]:
        self._expire(now_s)
        total = dict.fromkeys(Outcome, 0)
        for _, bucket in self._buckets:
            for outcome, n in bucket.items():
                total[outcome] += n
        return total

    def ratio(self, now_s: float) -> float:
        """Good over all outcomes in the window; 1.0 when there were none."""
        counts = self.counts(now_s)
        total = sum(counts.values())
        return counts[Outcome.GOOD] / total if total else 1.0

    def _expire(self, now_s: float) -> None:
        oldest = now_s - self.window_s
        buckets = self._buckets
        while buckets and buckets[0][0] + 1 <= oldest:
            buckets.popleft()
