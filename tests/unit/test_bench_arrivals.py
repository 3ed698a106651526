"""baton-bench arrival schedules: rates, burstiness, stages, ramps (pure, seeded)."""

import itertools
import random
import statistics

import pytest

from services.bench.arrivals import (
    arrival_times,
    build_stages,
    parse_stages,
    stage_at,
    truncate,
)


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def _cv(values: list[float]) -> float:
    return statistics.pstdev(values) / statistics.fmean(values)


def test_poisson_arrivals_match_the_rate_over_many_samples():
    stages = build_stages([(50.0, 200.0)])
    times = arrival_times(stages, "poisson", 1.0, random.Random(1))
    assert len(times) == pytest.approx(10_000, rel=0.03)  # 3 sigma
    assert _cv(_gaps(times)) == pytest.approx(1.0, abs=0.05)
    assert times == sorted(times)
    assert times[0] > 0
    assert times[-1] < 200.0


def test_gamma_burstiness_sets_the_coefficient_of_variation():
    stages = build_stages([(50.0, 200.0)])
    bursty = arrival_times(stages, "gamma", 0.25, random.Random(2))
    smooth = arrival_times(stages, "gamma", 4.0, random.Random(2))
    assert _cv(_gaps(bursty)) == pytest.approx(2.0, rel=0.15)  # 1 / sqrt(0.25)
    assert _cv(_gaps(smooth)) == pytest.approx(0.5, rel=0.1)  # 1 / sqrt(4)
    # Burstiness changes the shape, not the mean rate.
    assert len(bursty) == pytest.approx(10_000, rel=0.1)
    assert len(smooth) == pytest.approx(10_000, rel=0.03)


def test_constant_arrivals_are_evenly_spaced_with_the_exact_count():
    times = arrival_times(build_stages([(20.0, 3.0)]), "constant", 1.0, random.Random(0))
    assert len(times) == 60
    assert times == pytest.approx([k / 20 for k in range(60)])


def test_stages_switch_the_rate_at_their_boundaries():
    stages = build_stages(parse_stages("10:2,30:1,0:1,5:2"))
    times = arrival_times(stages, "constant", 1.0, random.Random(0))
    counts = [0] * len(stages)
    for t in times:
        counts[stage_at(stages, t)] += 1
    assert counts == [20, 30, 0, 10]
    assert [s.label for s in stages] == ["10 req/s", "30 req/s", "0 req/s", "5 req/s"]
    assert [s.start_s for s in stages] == [0.0, 2.0, 3.0, 4.0]
    assert all(4.0 <= t < 6.0 for t in times[50:])


def test_ramp_rises_linearly_into_the_first_stage():
    stages = build_stages([(20.0, 5.0)], ramp_s=10.0)
    assert stages[0].label == "ramp to 20"
    times = arrival_times(stages, "constant", 1.0, random.Random(0))
    in_ramp = [t for t in times if t < 10.0]
    assert len(in_ramp) == 100  # the mean rate is 10 req/s over 10 s
    # The rate is t * 2 req/s: a quarter of the ramp's arrivals come in its first half.
    assert sum(1 for t in in_ramp if t < 5.0) == 25
    assert len(times) - len(in_ramp) == 100


def test_the_same_seed_gives_the_same_schedule():
    stages = build_stages([(30.0, 10.0)])
    first = arrival_times(stages, "gamma", 0.5, random.Random(7))
    assert first == arrival_times(stages, "gamma", 0.5, random.Random(7))
    assert first != arrival_times(stages, "gamma", 0.5, random.Random(8))


@pytest.mark.parametrize("text", ["10", "10:0", "-1:5", "a:b", "10:5:1x"])
def test_parse_stages_rejects_malformed_stages(text):
    with pytest.raises(ValueError, match="stages"):
        parse_stages(text)


def test_stage_at_clamps_outside_the_schedule():
    stages = build_stages([(1.0, 2.0), (2.0, 2.0)])
    assert [stage_at(stages, t) for t in (-1.0, 0.0, 1.99, 2.0, 3.5, 9.0)] == [0, 0, 0, 1, 1, 1]


def test_truncate_cuts_the_running_stage_and_drops_later_ones():
    stages = build_stages([(10.0, 4.0), (20.0, 4.0)], ramp_s=2.0)
    cut = truncate(stages, 3.0)
    assert [(s.label, s.duration_s) for s in cut] == [("ramp to 10", 2.0), ("10 req/s", 1.0)]
    half_ramp = truncate(stages, 1.0)[0]
    assert (half_ramp.duration_s, half_ramp.rate_end) == (1.0, 5.0)
