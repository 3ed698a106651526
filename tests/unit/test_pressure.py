"""The frontend's own overload flag: set when its loop lags for a while, cleared with
hysteresis, never by one late tick."""

import pytest

from services.frontend.pressure import LoopPressure


def test_one_late_tick_does_not_overload_but_sustained_lag_does():
    pressure = LoopPressure(0.025, weight=0.1)
    pressure.observe(0.2)  # one 200 ms hiccup (a GC pause, say)
    assert not pressure.is_overloaded
    for _ in range(30):
        pressure.observe(0.06)
    assert pressure.is_overloaded


def test_overload_clears_only_below_half_the_bound():
    pressure = LoopPressure(0.025, weight=0.5)
    for _ in range(10):
        pressure.observe(0.1)
    assert pressure.is_overloaded
    for _ in range(3):
        pressure.observe(0.02)
    assert pressure.is_overloaded  # between the bound and half of it: still overloaded
    for _ in range(20):
        pressure.observe(0.0)
    assert not pressure.is_overloaded


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
    # flag would clear after a few ticks that read on time, as most do on an idle loop.
    pressure = LoopPressure(0.000001)
    pressure.observe(0.001)
    assert pressure.is_overloaded
    for _ in range(20):  # 0.4 s of ticks on time
        pressure.observe(0.0)
    assert pressure.is_overloaded
