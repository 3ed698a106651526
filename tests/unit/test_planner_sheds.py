"""The frontends' sheds as the planner reads them: their share over the last seconds, the pool
they are for, and the step they size (a shed request reaches no worker's reports)."""

import math

import pytest

from proto.messages import FrontendLoad, InstanceId
from services.planner.observer import SHED_WINDOW_S, PoolObserver
from services.planner.policy import Limits, Mode, PolicyConfig, PoolPlanner
from services.planner.signals import (
    PoolView,
    Role,
    Thresholds,
    WorkerLoad,
    pressure,
    shed_pool,
    shed_pools,
    unshed_factor,
)


def answered(frontend_id: str, requests: int, shed: int) -> FrontendLoad:
    return FrontendLoad(frontend_id=InstanceId(frontend_id), num_requests=requests, num_shed=shed)


def test_the_shed_share_is_summed_over_frontends_within_the_window():
    observer = PoolObserver(stale_s=1.0)
    observer.record_frontend(answered("a", 100, 0), 10.0)
    observer.record_frontend(answered("b", 0, 0), 10.0)
    assert observer.shed_fraction(10.0) == 0.0  # one report each spans no time yet
    observer.record_frontend(answered("a", 300, 100), 11.0)  # 200 in, 100 shed
    observer.record_frontend(answered("b", 200, 20), 11.0)  # 200 in, 20 shed
    assert observer.shed_fraction(11.0) == pytest.approx(120 / 400)
    # Old samples leave the window: only the last SHED_WINDOW_S counts.
    later = 11.0 + SHED_WINDOW_S + 1.0
    observer.record_frontend(answered("a", 500, 100), later - 0.5)
    observer.record_frontend(answered("a", 700, 100), later)
    assert observer.shed_fraction(later) == 0.0  # "b" went quiet and is forgotten; "a" sheds none


def test_a_frontend_whose_counters_go_back_starts_again():
    observer = PoolObserver(stale_s=1.0)
    observer.record_frontend(answered("a", 1000, 900), 10.0)
    observer.record_frontend(answered("a", 10, 0), 10.6)  # restarted under the same id
    observer.record_frontend(answered("a", 110, 50), 11.2)
    assert observer.shed_fraction(11.2) == pytest.approx(0.5)


def test_sheds_read_over_and_size_a_load_mode_step():
    view = PoolView(
        role=Role.DECODE,
        num_workers=1,
        loads=(WorkerLoad(num_running=2, max_num_seqs=100),),
        shed_fraction=0.6,  # 2.5 times what one worker serves arrives
    )
    reading = pressure(view, Thresholds(), wait_budget_s=None)
    assert (reading.is_over, reading.label) == (True, "shed")
    p = PoolPlanner(
        PolicyConfig(up_intervals=1, up_cooldown_s=0.0), Limits(min_replicas=1, max_replicas=8)
    )
    decision = p.decide(view, now_s=100.0)
    assert (decision.desired, decision.reason) == (math.ceil(1 / 0.4), "shed")
    # Below the threshold the pool reads by its workers alone (here: neither over nor under).
    quiet = PoolView(role=Role.DECODE, num_workers=1, loads=view.loads, shed_fraction=0.01)
    assert pressure(quiet, Thresholds(), wait_budget_s=None).label == "ok"


def test_sla_mode_counts_the_shed_requests_as_demand():
    load = WorkerLoad(num_running=70, max_num_seqs=100)
    settings = {"mode": Mode.SLA, "up_intervals": 1, "up_cooldown_s": 0.0, "horizon_s": 0.0}
    served = PoolPlanner(PolicyConfig(**settings), Limits(1, 8))  # type: ignore[arg-type]
    assert served.decide(PoolView(role=Role.DECODE, num_workers=1, loads=(load,)), 1.0).desired == 1
    shedding = PoolPlanner(PolicyConfig(**settings), Limits(1, 8))  # type: ignore[arg-type]
    view = PoolView(role=Role.DECODE, num_workers=1, loads=(load,), shed_fraction=0.5)
    assert shedding.decide(view, 1.0).desired == 2  # 70 served, 140 wanted, 70 per worker


def test_sheds_go_to_the_pool_with_the_longer_wait():
    slow = (WorkerLoad(predicted_wait_s=0.4),)
    fast = (WorkerLoad(predicted_wait_s=0.05),)
    decode_only = {Role.DECODE: PoolView(role=Role.DECODE, num_workers=1, loads=slow)}
    assert shed_pool(decode_only) is Role.DECODE
    views = {
        Role.DECODE: PoolView(role=Role.DECODE, num_workers=1, loads=fast),
        Role.PREFILL: PoolView(role=Role.PREFILL, num_workers=1, loads=slow),
    }
    assert shed_pool(views) is Role.PREFILL
    views[Role.DECODE], views[Role.PREFILL] = views[Role.PREFILL], views[Role.DECODE]
    views = {role: PoolView(role=role, num_workers=1, loads=v.loads) for role, v in views.items()}
    assert shed_pool(views) is Role.DECODE
    # A prefill pool with no report says nothing: the decode pool gets them.
    views[Role.PREFILL] = PoolView(role=Role.PREFILL, num_workers=0)
    assert shed_pool(views) is Role.DECODE


def test_the_sizing_factor_is_bounded():
    assert unshed_factor(0.0) == 1.0
    assert unshed_factor(0.5) == pytest.approx(2.0)
    assert unshed_factor(1.0) == pytest.approx(10.0)


def test_sheds_under_their_limit_do_not_hold_a_pool_up():
    light = (WorkerLoad(num_running=1, max_num_seqs=100),) * 2
    view = PoolView(role=Role.DECODE, num_workers=2, loads=light, shed_fraction=0.01)
    reading = pressure(view, Thresholds(), wait_budget_s=None)
    assert (reading.is_under, reading.label) == (True, "idle")


def test_sheds_go_to_both_pools_when_both_waits_read_over():
    # A 2 s budget read over at half of it: 1 s.
    def views(prefill_wait_s: float, decode_wait_s: float) -> dict[Role, PoolView]:
        return {
            role: PoolView(role=role, num_workers=1, loads=(WorkerLoad(predicted_wait_s=w),))
            for role, w in ((Role.PREFILL, prefill_wait_s), (Role.DECODE, decode_wait_s))
        }

    assert shed_pools(views(1.2, 1.0), 2.0, 0.5) == (Role.PREFILL, Role.DECODE)
    assert shed_pools(views(1.2, 0.9), 2.0, 0.5) == (Role.PREFILL,)  # only one is short
    assert shed_pools(views(0.3, 0.4), 2.0, 0.5) == (Role.DECODE,)  # neither: the longer
    assert shed_pools(views(1.2, 1.0), None, 0.5) == (Role.PREFILL,)  # no objective, no limit
