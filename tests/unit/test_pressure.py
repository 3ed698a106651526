"""The frontend's own overload: a shed fraction steered by its loop's lag, up while the
smoothed lag is above the bound, down while below, never raised by one late tick."""

import random

import pytest

from services.frontend.pressure import LoopPressure


def test_one_late_tick_does_not_overload_but_sustained_lag_does():
    pressure = LoopPressure(0.025, weight=0.1)
    pressure.observe(0.2)  # one 200 ms hiccup (a GC pause, say)
    assert not pressure.is_overloaded
    assert pressure.shed_fraction == 0.0
    for _ in range(30):
        pressure.observe(0.06)
    assert pressure.is_overloaded
    assert 0.0 < pressure.shed_fraction <= 1.0


def test_the_fraction_rises_while_the_lag_is_above_the_bound_and_falls_while_below():
    pressure = LoopPressure(0.025, weight=1.0)
    fractions = []
    for _ in range(6):
        pressure.observe(0.05)  # twice the bound
        fractions.append(pressure.shed_fraction)
    assert fractions == sorted(fractions)
    assert fractions[-1] > fractions[0] > 0.0
    high = pressure.shed_fraction
    for _ in range(3):
        pressure.observe(0.02)  # under the bound: the fraction eases, it does not drop
    assert 0.0 < pressure.shed_fraction < high
    for _ in range(50):
        pressure.observe(0.0)
    assert pressure.shed_fraction == 0.0
    assert not pressure.is_overloaded


def test_a_lag_held_at_the_bound_holds_the_fraction():
    pressure = LoopPressure(0.025, weight=1.0)
    for _ in range(4):
        pressure.observe(0.05)
    held = pressure.shed_fraction
    for _ in range(100):
        pressure.observe(0.025)
    assert pressure.shed_fraction == pytest.approx(held)


def test_the_further_above_the_bound_the_faster_it_rises_up_to_shedding_all():
    slow, fast = LoopPressure(0.025, weight=1.0), LoopPressure(0.025, weight=1.0)
    slow.observe(0.03)
    fast.observe(0.1)
    assert fast.shed_fraction > slow.shed_fraction > 0.0
    for _ in range(20):
        fast.observe(0.1)  # 0.4 s at four times the bound
    assert fast.shed_fraction == 1.0
    assert all(fast.should_shed() for _ in range(100))


def test_the_draw_sheds_about_the_fraction():
    pressure = LoopPressure(0.025, weight=1.0, rng=random.Random(7))
    assert not any(pressure.should_shed() for _ in range(100))  # no lag: nothing shed
    pressure.shed_fraction = 0.3
    shed = sum(pressure.should_shed() for _ in range(10_000))
    assert 2_700 < shed < 3_300


def test_pressure_needs_a_positive_bound():
    with pytest.raises(ValueError, match="max_lag_s"):
        LoopPressure(0.0)


def test_one_stall_never_overloads_however_long_but_two_in_a_row_do():
    pressure = LoopPressure(0.025)  # the defaults: a tick weighs 0.2
    pressure.observe(5.0)  # the process descheduled for 5 s, once
    assert not pressure.is_overloaded
    for _ in range(20):
        pressure.observe(0.0)
    pressure.observe(0.1)
    pressure.observe(0.1)
    assert pressure.is_overloaded


def test_a_bound_below_the_clocks_resolution_reads_any_late_tick_as_overload():
    # uvloop's clock reads a tick 0 or at least 1 ms late. A bound of 1 us (what the early
    # shed's tests set, to shed every request) must not be capped to 4 us a tick, or the
    # fraction would fall after a few ticks that read on time, as most do on an idle loop.
    pressure = LoopPressure(0.000001)
    pressure.observe(0.001)
    assert pressure.shed_fraction == 1.0
    for _ in range(20):  # 0.4 s of ticks on time
        pressure.observe(0.0)
    assert pressure.shed_fraction == 1.0
