"""Arrival schedules (pure): stages of a rate, and seeded arrival times over them.

The rate is piecewise linear in time: constant within a stage, rising from 0 during an
optional ramp. Arrival times come from time rescaling: a renewal process of mean gap 1 is
drawn in "expected arrivals" space and mapped back through the inverse of the cumulative
rate, so stages, ramps and burstiness compose without special cases. Gaps are exponential
(Poisson), gamma with shape ``burstiness`` (coefficient of variation ``1/sqrt(burstiness)``,
as vLLM's bench), or exactly 1 (constant: a stage of R req/s for D s gets R*D arrivals).
"""

import bisect
import math
import random
from dataclasses import dataclass

ARRIVAL_PROCESSES = ("poisson", "gamma", "constant")


@dataclass(frozen=True, slots=True)
class Stage:
    """A span of the schedule whose rate goes linearly from ``rate_start`` to ``rate_end``."""

    label: str
    start_s: float
    duration_s: float
    rate_start: float
    rate_end: float

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s

    @property
    def num_expected(self) -> float:
        """Expected arrivals in the stage: the integral of its rate."""
        return (self.rate_start + self.rate_end) / 2 * self.duration_s

    def offset_of(self, num_arrivals: float) -> float:
        """Seconds into the stage by which ``num_arrivals`` are expected (inverse of the
        integral ``r0*t + (r1-r0)*t^2/(2D)``, in the form that stays exact as r1 -> r0)."""
        if num_arrivals <= 0:
            return 0.0
        r0 = self.rate_start
        k = (self.rate_end - r0) / (2 * self.duration_s)
        return 2 * num_arrivals / (r0 + math.sqrt(max(0.0, r0 * r0 + 4 * k * num_arrivals)))


def stage_label(rate: float) -> str:
    return f"{rate:g} req/s"


def parse_stages(text: str) -> list[tuple[float, float]]:
    """``"20:30,60:10"`` -> ``[(20.0, 30.0), (60.0, 10.0)]`` (req/s, seconds)."""
    stages: list[tuple[float, float]] = []
    for part in text.split(","):
        if not part.strip():
            continue
        rate_text, sep, duration_text = part.partition(":")
        try:
            rate, duration_s = float(rate_text), float(duration_text)
        except ValueError:
            raise ValueError(f"stages: expected 'RATE:SECONDS', got {part.strip()!r}") from None
        if not sep or not math.isfinite(rate) or rate < 0 or not duration_s > 0:
            raise ValueError(f"stages: need a rate >= 0 and seconds > 0, got {part.strip()!r}")
        stages.append((rate, duration_s))
    return stages


def build_stages(rates: list[tuple[float, float]], ramp_s: float = 0.0) -> list[Stage]:
    """Consecutive stages of (req/s, seconds), after a ramp from 0 to the first rate."""
    stages: list[Stage] = []
    start_s = 0.0
    if ramp_s > 0 and rates:
        first_rate = rates[0][0]
        stages.append(Stage(f"ramp to {first_rate:g}", 0.0, ramp_s, 0.0, first_rate))
        start_s = ramp_s
    for rate, duration_s in rates:
        stages.append(Stage(stage_label(rate), start_s, duration_s, rate, rate))
        start_s += duration_s
    return stages


def unit_gap(process: str, burstiness: float, rng: random.Random) -> float:
    """One gap of a renewal process with mean 1."""
    if process == "poisson":
        return rng.expovariate(1.0)
    if process == "gamma":
        return rng.gammavariate(burstiness, 1.0 / burstiness)
    if process == "constant":
        return 1.0
    raise ValueError(f"arrival must be one of {ARRIVAL_PROCESSES}, got {process!r}")


def arrival_times(
    stages: list[Stage], process: str, burstiness: float, rng: random.Random
) -> list[float]:
    """Seconds from the start at which requests are due, ascending, all before the last
    stage ends. Constant arrivals start at 0; random ones after a first random gap."""
    times: list[float] = []
    expected = 0.0 if process == "constant" else unit_gap(process, burstiness, rng)
    stage_base = 0.0  # expected arrivals before the current stage
    for stage in stages:
        stage_end = stage_base + stage.num_expected
        while expected < stage_end:
            times.append(stage.start_s + stage.offset_of(expected - stage_base))
            expected += unit_gap(process, burstiness, rng)
        stage_base = stage_end
    return times


def truncate(stages: list[Stage], end_s: float) -> list[Stage]:
    """The stages as far as a run stopped at ``end_s`` got: later ones dropped, the one
    running then cut short (so its rates divide by the time it actually ran)."""
    kept: list[Stage] = []
    for s in stages:
        if s.start_s >= end_s and kept:
            break
        duration_s = max(0.0, min(s.duration_s, end_s - s.start_s))
        rate_end = s.rate_start + (s.rate_end - s.rate_start) * duration_s / s.duration_s
        kept.append(Stage(s.label, s.start_s, duration_s, s.rate_start, rate_end))
    return kept


def stage_at(stages: list[Stage], t_s: float) -> int:
    """Index of the stage holding time ``t_s`` (the first before 0, the last after the end)."""
    starts = [s.start_s for s in stages]
    return max(0, min(len(stages) - 1, bisect.bisect_right(starts, t_s) - 1))
