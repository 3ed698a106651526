"""The planner's role-switch decision (pure): when a worker changes role instead of a process
starting, which worker, and how the pools' targets follow."""

from dataclasses import replace

import pytest

from proto.messages import InstanceId, LoadMetrics, WorkerInfo, WorkerRole
from services.planner.config import PlannerConfig
from services.planner.connectors import DryRunConnector
from services.planner.observer import PoolObserver
from services.planner.planner import Planner
from services.planner.policy import (
    Candidate,
    Decision,
    Limits,
    PolicyConfig,
    PoolPlanner,
    Switch,
    choose_worker,
    plan_switch,
)
from services.planner.signals import (
    PoolView,
    Role,
    Thresholds,
    WorkerLoad,
    pressure,
    with_local_prefill,
)

LIMITS = {Role.DECODE: Limits(1, 4), Role.PREFILL: Limits(1, 4)}


def busy() -> WorkerLoad:
    return WorkerLoad(num_running=8, num_waiting=10, kv_usage=0.3, max_num_seqs=8)


def idle() -> WorkerLoad:
    return WorkerLoad(max_num_seqs=8)


def view(role: Role, n: int, load: WorkerLoad | None) -> PoolView:
    return PoolView(role=role, num_workers=n, loads=(load,) * n if load else ())


def planner(**overrides: object) -> PoolPlanner:
    settings: dict[str, object] = {
        "up_intervals": 1,
        "down_intervals": 5,
        "up_cooldown_s": 0.0,
        "down_cooldown_s": 0.0,
        **overrides,
    }
    return PoolPlanner(PolicyConfig(**settings), Limits(1, 4))  # type: ignore[arg-type]


def up(n: int) -> Decision:
    return Decision(n + 1, n, "queue", "waiting 10.0/worker >= 4", direction=1)


def under(n: int, streak: int = 1) -> Decision:
    text = f"load fits on fewer ({streak}/5 intervals)"
    return Decision(n, n, "streak", text, direction=-1, streak=streak)


def steady(n: int) -> Decision:
    return Decision(n, n, "steady", "batch 0.50 of capacity", direction=0)


def views(num_decode: int, num_prefill: int) -> dict[Role, PoolView]:
    return {
        Role.DECODE: view(Role.DECODE, num_decode, busy()),
        Role.PREFILL: view(Role.PREFILL, num_prefill, idle()),
    }


def test_a_pool_stepping_up_takes_a_worker_the_other_can_spare():
    decisions = {Role.DECODE: up(2), Role.PREFILL: under(2)}
    switch = plan_switch(decisions, views(2, 2), LIMITS)
    assert switch is not None
    assert (switch.source, switch.target) == (Role.PREFILL, Role.DECODE)
    assert "decode queue" in switch.detail
    assert "prefill streak" in switch.detail


def test_the_other_way_round_prefill_takes_a_decode_worker():
    decisions = {Role.DECODE: under(3), Role.PREFILL: up(1)}
    switch = plan_switch(decisions, views(3, 1), LIMITS)
    assert switch == Switch(Role.DECODE, Role.PREFILL, switch.detail if switch else "")


def test_a_source_gives_a_worker_only_after_reading_under_for_the_streak_asked():
    """A prefill worker between two prompts has no request on it for an instant: one such
    reading is no reason to take it away (the planner asks for its up streak, 3)."""
    decisions = {Role.DECODE: up(2), Role.PREFILL: under(2, streak=2)}
    assert plan_switch(decisions, views(2, 2), LIMITS, min_spare_streak=3) is None
    decisions[Role.PREFILL] = under(2, streak=3)
    assert plan_switch(decisions, views(2, 2), LIMITS, min_spare_streak=3) is not None
    # A pool raised to its minimum is a limit, not a reading: any worker to spare will do.
    to_min = Decision(3, 2, "min", "limits Limits(min_replicas=3, max_replicas=4)")
    decisions = {Role.DECODE: to_min, Role.PREFILL: under(2, streak=1)}
    assert plan_switch(decisions, views(2, 2), LIMITS, min_spare_streak=3) is not None


def test_the_planner_asks_a_source_for_its_up_streak_but_never_past_its_down_streak():
    assert (
        Planner(
            PlannerConfig(up_intervals=3, down_intervals=10), DryRunConnector()
        ).min_spare_streak
        == 3
    )
    assert (
        Planner(PlannerConfig(up_intervals=3, down_intervals=2), DryRunConnector()).min_spare_streak
        == 2
    )


def test_a_last_prefill_worker_with_prompts_arriving_is_not_idle_between_them():
    between = WorkerLoad(prefill_s_per_token=2.5e-4, prefill_token_rate=2000.0)  # 0.5 s/s
    reading = pressure(view(Role.PREFILL, 1, between), Thresholds(max_prefill_busy=0.8), None)
    assert (reading.is_under, reading.label) == (False, "ok")
    assert "prompts keep arriving" in reading.detail
    trickle = replace(between, prefill_token_rate=400.0)  # 0.1 s/s
    assert pressure(view(Role.PREFILL, 1, trickle), Thresholds(), None).is_under


def test_a_full_decode_workers_prompts_still_count_as_prefill_time():
    # KV 0.96, a tenth of its time on prompts: 0.864 without them, still over 0.85.
    full = WorkerLoad(
        num_running=8, num_waiting=6, kv_usage=0.96, max_num_seqs=64,
        prefill_s_per_token=2.5e-4, prefill_token_rate=400.0,
    )  # fmt: skip
    decode, prefill = with_local_prefill(
        view(Role.DECODE, 2, full), view(Role.PREFILL, 0, None), Thresholds()
    )
    # Its queue stays decode work (the cache is full even without the prompts' share) ...
    assert [load.num_waiting for load in decode.loads] == [6, 6]
    assert [load.kv_usage for load in decode.loads] == pytest.approx([0.864, 0.864])
    assert all(load.num_waiting == 0 for load in prefill.loads)
    # ... and its prompts' time is the empty prefill pool's.
    assert [load.prefill_busy for load in prefill.loads] == pytest.approx([0.1, 0.1])
    # A cache that is full only because prompts stall its streams is not full.
    stalled = replace(full, prefill_token_rate=3600.0)  # 0.9 of its time
    decode, prefill = with_local_prefill(
        view(Role.DECODE, 1, stalled), view(Role.PREFILL, 0, None), Thresholds()
    )
    assert (decode.loads[0].num_waiting, prefill.loads[0].num_waiting) == (0, 6)


def test_decisions_carry_their_streak():
    p = planner(down_intervals=3, down_cooldown_s=0.0)
    readings = [p.decide(view(Role.PREFILL, 2, idle()), now_s=t) for t in (1.0, 2.0, 3.0)]
    assert [(d.direction, d.streak, d.reason) for d in readings] == [
        (-1, 1, "streak"),
        (-1, 2, "streak"),
        (-1, 3, "idle"),  # acted on: the streak that led to the action
    ]
    assert p.decide(view(Role.PREFILL, 1, busy()), now_s=4.0).streak == 1


def test_no_switch_while_the_other_pool_is_not_under():
    # Between the thresholds, or busy itself: a process starts (the connector's decision).
    assert plan_switch({Role.DECODE: up(2), Role.PREFILL: steady(2)}, views(2, 2), LIMITS) is None
    assert plan_switch({Role.DECODE: up(2), Role.PREFILL: up(2)}, views(2, 2), LIMITS) is None


def test_no_switch_below_the_source_minimum_or_above_the_target_maximum():
    decisions = {Role.DECODE: up(2), Role.PREFILL: under(1)}
    assert plan_switch(decisions, views(2, 1), LIMITS) is None  # prefill at its min (1)
    full = {Role.DECODE: Limits(1, 2), Role.PREFILL: Limits(0, 4)}
    assert plan_switch({Role.DECODE: up(2), Role.PREFILL: under(2)}, views(2, 2), full) is None


def test_no_switch_with_one_pool_planned_or_no_pool_short():
    assert plan_switch({Role.DECODE: up(2)}, views(2, 2), LIMITS) is None
    decisions = {Role.DECODE: steady(2), Role.PREFILL: under(2)}
    assert plan_switch(decisions, views(2, 2), LIMITS) is None  # a plain scale-down


def test_a_pool_held_at_the_total_cap_switches_where_it_could_not_start_one():
    p = planner()
    decision = p.decide(view(Role.DECODE, 2, busy()), now_s=10.0, max_total=2)
    assert (decision.desired, decision.reason, decision.direction) == (2, "at_total", 1)
    switch = plan_switch({Role.DECODE: decision, Role.PREFILL: under(2)}, views(2, 2), LIMITS)
    assert switch is not None
    assert switch.target is Role.DECODE
    # Without the cap, the same reading starts a process.
    assert planner().decide(view(Role.DECODE, 2, busy()), now_s=10.0).desired == 3


def test_the_total_cap_only_stops_growth():
    p = planner(down_intervals=1)
    # Above the cap already: it is not cut down for that, and an idle pool still shrinks.
    decision = p.decide(view(Role.DECODE, 3, idle()), now_s=10.0, max_total=3)
    assert (decision.desired, decision.reason) == (2, "idle")
    # Room for one more under the cap: a step up of one is allowed.
    assert planner().decide(view(Role.DECODE, 2, busy()), now_s=10.0, max_total=3).desired == 3


def test_the_under_reading_counts_before_the_down_streak_is_complete():
    p = planner(down_intervals=5)
    decision = p.decide(view(Role.PREFILL, 2, idle()), now_s=10.0)
    assert (decision.reason, decision.direction, decision.desired) == ("streak", -1, 2)


def test_a_switch_moves_both_targets_and_starts_their_cooldowns():
    decode, prefill = planner(up_cooldown_s=5.0), planner(up_cooldown_s=5.0)
    decode.decide(view(Role.DECODE, 2, busy()), now_s=10.0, max_total=4)
    prefill.decide(view(Role.PREFILL, 2, idle()), now_s=10.0)
    decode.note_switch(+1, now_s=10.0)
    prefill.note_switch(-1, now_s=10.0)
    assert (decode.desired, prefill.desired) == (3, 1)
    # Pending until the directory shows the switch ...
    assert decode.decide(view(Role.DECODE, 2, busy()), now_s=11.0).reason == "pending"
    # ... then the cool-down holds a further step up.
    later = decode.decide(view(Role.DECODE, 3, busy()), now_s=12.0)
    assert (later.desired, later.reason) == (3, "cooldown")


def test_choose_worker_takes_the_one_with_least_work_that_reported():
    candidates = [
        Candidate(InstanceId("b"), WorkerLoad(num_running=3, num_waiting=1)),
        Candidate(InstanceId("a"), WorkerLoad(num_running=1, num_waiting=3)),
        Candidate(InstanceId("c"), WorkerLoad(num_running=0, num_waiting=1)),
        Candidate(InstanceId("d"), None),  # no fresh report: unknown work
    ]
    assert choose_worker(candidates, Role.DECODE) == "c"
    assert choose_worker(candidates[:2], Role.DECODE) == "a"  # a tie goes to the lower id
    assert choose_worker(candidates[3:], Role.DECODE) is None


def test_choose_worker_skips_workers_that_cannot_prefill():
    candidates = [
        Candidate(InstanceId("a"), WorkerLoad(), can_prefill=False),
        Candidate(InstanceId("b"), WorkerLoad(num_running=5)),
    ]
    assert choose_worker(candidates, Role.PREFILL) == "b"
    assert choose_worker(candidates[:1], Role.PREFILL) is None
    assert choose_worker(candidates[:1], Role.DECODE) == "a"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_total_workers": -1}, "max_total_workers"),
        (
            {
                "max_total_workers": 2,
                "min_decode_workers": 2,
                "min_prefill_workers": 1,
                "max_prefill_workers": 2,
            },
            "max_total_workers",
        ),
        ({"switch_timeout_s": 0.0}, "switch_timeout_s"),
    ],
)
def test_planner_config_checks_the_switch_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PlannerConfig(**kwargs)


def worker(worker_id: str, role: WorkerRole, **kw: object) -> WorkerInfo:
    return WorkerInfo(
        worker_id=InstanceId(worker_id),
        model="m",
        role=role,
        subject=f"s.{worker_id}",
        max_num_seqs=8,
        num_kv_blocks=100,
        **kw,  # type: ignore[arg-type]
    )


def report(worker_id: str, num_running: int, num_awaiting_kv: int = 0) -> LoadMetrics:
    return LoadMetrics(
        worker_id=InstanceId(worker_id),
        num_running=num_running,
        num_waiting=0,
        num_free_blocks=50,
        num_total_blocks=100,
        kv_usage=0.1,
        num_awaiting_kv=num_awaiting_kv,
    )


def test_requests_awaiting_their_kv_are_not_counted_as_decode_batch():
    # A slow prefill pool must not make the decode pool look busy.
    observer = PoolObserver(stale_s=1.0)
    observer.sync_workers({InstanceId("a"): worker("a", WorkerRole.DECODE)})
    observer.record(report("a", num_running=6, num_awaiting_kv=5), now_s=1.0)
    [load] = observer.view(Role.DECODE, now_s=1.0).loads
    assert load.num_running == 1


def test_switch_candidates_are_the_pools_own_workers_with_their_reports():
    observer = PoolObserver(stale_s=1.0)
    observer.sync_workers(
        {
            InstanceId("a"): worker("a", WorkerRole.DECODE, kv_agent="tcp"),
            InstanceId("b"): worker("b", WorkerRole.DECODE),  # no KV agent
            InstanceId("g"): worker("g", WorkerRole.AGGREGATED, kv_agent="tcp"),
            InstanceId("d"): worker("d", WorkerRole.DECODE, is_draining=True),
            InstanceId("p"): worker("p", WorkerRole.PREFILL, kv_agent="tcp"),
        }
    )
    observer.record(report("a", num_running=3), now_s=1.0)
    observer.record(report("b", num_running=0), now_s=1.0)
    candidates = observer.candidates(Role.DECODE, now_s=1.5)
    assert [(c.worker_id, c.can_prefill) for c in candidates] == [("a", True), ("b", False)]
    # b has less work but cannot hold KV for decode workers: a goes.
    assert choose_worker(candidates, Role.PREFILL) == "a"
    assert choose_worker(observer.candidates(Role.PREFILL, now_s=1.5), Role.DECODE) is None


# --- an empty prefill pool: the decode workers' own prompts are its demand -----------------------


def prompt_queue() -> WorkerLoad:
    """A decode worker prefilling its own long prompts: a queue, its batch far from full."""
    return WorkerLoad(
        num_running=2,
        num_waiting=6,
        num_waiting_tokens=9000,
        kv_usage=0.1,
        predicted_wait_s=1.5,
        wait_per_token_s=1e-4,
        max_num_seqs=32,
    )


def test_an_empty_prefill_pool_reads_the_prompts_queued_on_decode_workers():
    decode, prefill = with_local_prefill(
        view(Role.DECODE, 2, prompt_queue()), view(Role.PREFILL, 0, None), Thresholds()
    )
    assert (decode.num_workers, prefill.num_workers) == (2, 0)
    assert [load.num_waiting for load in prefill.loads] == [6, 6]
    assert [load.num_waiting_tokens for load in prefill.loads] == [9000, 9000]
    assert [load.predicted_wait_s for load in prefill.loads] == [1.5, 1.5]
    assert all(load.num_running == 0 and load.kv_usage == 0 for load in prefill.loads)
    # The decode pool keeps its batch and KV cache, not the queue it handed over.
    assert [(load.num_running, load.num_waiting, load.kv_usage) for load in decode.loads] == [
        (2, 0, 0.1),
        (2, 0, 0.1),
    ]


def test_a_full_batchs_queue_stays_decode_work():
    full = WorkerLoad(num_running=8, num_waiting=6, num_waiting_tokens=100, max_num_seqs=8)
    decode, prefill = with_local_prefill(
        view(Role.DECODE, 2, full), view(Role.PREFILL, 0, None), Thresholds()
    )
    assert decode.loads == (full, full)
    assert all(load == WorkerLoad() for load in prefill.loads)


def test_a_full_kv_caches_queue_stays_decode_work():
    full = WorkerLoad(num_running=3, num_waiting=6, kv_usage=0.9, max_num_seqs=32)
    decode, prefill = with_local_prefill(
        view(Role.DECODE, 1, full), view(Role.PREFILL, 0, None), Thresholds()
    )
    assert (decode.loads, prefill.loads) == ((full,), (WorkerLoad(),))


def test_a_prefill_pool_with_a_worker_is_read_as_it_is():
    pair = (view(Role.DECODE, 1, prompt_queue()), view(Role.PREFILL, 1, idle()))
    assert with_local_prefill(*pair, Thresholds()) == pair
    nothing = (view(Role.DECODE, 2, None), view(Role.PREFILL, 0, None))
    assert with_local_prefill(*nothing, Thresholds()) == nothing


def test_from_no_prefill_worker_a_prompt_queue_switches_a_decode_worker_back():
    """1 + 1 at a cap of 2 went to 0 + 2 for a decode-heavy phase; long prompts come back:
    the empty prefill pool steps up (held at the cap), the decode pool reads idle, and a
    decode worker switches to prefill."""
    limits = {Role.DECODE: Limits(1, 2), Role.PREFILL: Limits(0, 1)}
    decode_view, prefill_view = with_local_prefill(
        view(Role.DECODE, 2, prompt_queue()), view(Role.PREFILL, 0, None), Thresholds()
    )
    config = PolicyConfig(up_intervals=1, down_intervals=5, up_cooldown_s=0.0)
    prefill_plan = PoolPlanner(config, limits[Role.PREFILL])
    decode_plan = PoolPlanner(config, limits[Role.DECODE])
    decisions = {
        Role.DECODE: decode_plan.decide(decode_view, now_s=10.0, max_total=2),
        Role.PREFILL: prefill_plan.decide(prefill_view, now_s=10.0, max_total=0),
    }
    assert (decisions[Role.PREFILL].reason, decisions[Role.PREFILL].direction) == ("at_total", 1)
    assert decisions[Role.DECODE].direction == -1
    switch = plan_switch(decisions, {Role.DECODE: decode_view, Role.PREFILL: prefill_view}, limits)
    assert switch is not None
    assert (switch.source, switch.target) == (Role.DECODE, Role.PREFILL)
    # Unread, the same reports would have made the decode pool ask for more (its queue).
    unsplit = PoolPlanner(config, limits[Role.DECODE]).decide(
        view(Role.DECODE, 2, prompt_queue()), now_s=10.0, max_total=2
    )
    assert unsplit.direction == 1


def long_prompts(share: float, kv_usage: float) -> WorkerLoad:
    """A decode worker with no queue that spends ``share`` of its time on its own prompts
    (4,000 tokens a second arriving at 2.5e-4 s each is 1.0)."""
    return WorkerLoad(
        num_running=10,
        kv_usage=kv_usage,
        wait_per_token_s=1e-3,  # a queued token's wait counts decode steps: not its cost
        prefill_s_per_token=2.5e-4,
        prefill_token_rate=4000.0 * share,
        max_num_seqs=64,
    )


def test_local_prefill_time_moves_to_the_prefill_view_and_leaves_the_decode_pool_smaller():
    decode, prefill = with_local_prefill(
        view(Role.DECODE, 2, long_prompts(0.75, 0.6)), view(Role.PREFILL, 0, None), Thresholds()
    )
    assert [load.prefill_busy for load in prefill.loads] == pytest.approx([0.75, 0.75])
    # A quarter of the time decodes: each sequence lives four times as long as it would
    # without the prompts, so the pool would hold a quarter of the sequences and KV.
    assert [(load.num_running, load.prefill_busy) for load in decode.loads] == [(3, 0.0)] * 2
    assert [load.kv_usage for load in decode.loads] == pytest.approx([0.15, 0.15])
    # At most MAX_LOCAL_PREFILL_SHARE of a worker's time is read as prefill.
    swamped, _ = with_local_prefill(
        view(Role.DECODE, 1, long_prompts(3.0, 0.5)), view(Role.PREFILL, 0, None), Thresholds()
    )
    assert swamped.loads[0].kv_usage == pytest.approx(0.05)


def test_a_prefill_pool_is_over_when_its_prefill_time_passes_the_limit():
    limits = Thresholds(max_prefill_busy=0.8)
    tpot_s = 0.1
    # No prefill worker: the decode workers' prompts together are the first worker's load.
    one = PoolView(role=Role.PREFILL, num_workers=0, loads=(long_prompts(0.45, 0.0),))
    assert not pressure(one, limits, None, tpot_s).is_over
    two = PoolView(role=Role.PREFILL, num_workers=0, loads=(long_prompts(0.45, 0.0),) * 2)
    reading = pressure(two, limits, None, tpot_s)
    assert (reading.is_over, reading.label) == (True, "busy")
    assert "prefill 0.90 s/s per worker >= 0.8" in reading.detail
    # ... and only with a TPOT objective, which the decode workers' own prompts stall.
    assert not pressure(two, limits, None).is_over
    # With workers, per worker (objective or not): two at 0.45 each are not over, nor fit
    # on one; at 0.85 each they are over.
    pool = PoolView(role=Role.PREFILL, num_workers=2, loads=two.loads)
    reading = pressure(pool, limits, None)
    assert (reading.is_over, reading.is_under) == (False, False)
    hot = PoolView(role=Role.PREFILL, num_workers=2, loads=(long_prompts(0.85, 0.0),) * 2)
    assert pressure(hot, limits, None).label == "busy"
    # A decode pool has no such reading (its workers' own prefill is in its wait).
    reading = pressure(view(Role.DECODE, 2, long_prompts(0.95, 0.0)), limits, None, tpot_s)
    assert reading.label != "busy"


@pytest.mark.parametrize(
    ("share", "kv_usage", "switches"),
    [
        (0.95, 0.6, True),  # prefill-heavy: the KV is long-lived only because prompts stall it
        # Prefill over its limit as well, but the KV cache is full even without the prompts'
        # share (0.9 x 0.55): the decode pool cannot spare a worker.
        (0.45, 0.9, False),
        (0.2, 0.1, False),  # light: neither pool short
    ],
)
def test_a_fixed_total_of_two_decode_workers_gives_one_to_prefill_only_for_prefill_heavy_load(
    share: float, kv_usage: float, switches: bool
) -> None:
    """0 + 2 at a fixed total of 2 (what a decode-heavy phase leaves), with a TPOT
    objective: when prompts take most of both workers' time, one becomes the prefill worker;
    otherwise both stay."""
    limits = {Role.DECODE: Limits(1, 2), Role.PREFILL: Limits(0, 1)}
    decode_view, prefill_view = with_local_prefill(
        view(Role.DECODE, 2, long_prompts(share, kv_usage)),
        view(Role.PREFILL, 0, None),
        Thresholds(),
    )
    config = PolicyConfig(up_intervals=3, down_intervals=5, up_cooldown_s=0.0, tpot_s=0.1)
    decode_plan = PoolPlanner(config, limits[Role.DECODE])
    prefill_plan = PoolPlanner(config, limits[Role.PREFILL])
    views_ = {Role.DECODE: decode_view, Role.PREFILL: prefill_view}
    for now_s in (10.0, 11.0, 12.0):  # three intervals: the streaks the planner asks for
        decisions = {
            Role.DECODE: decode_plan.decide(decode_view, now_s=now_s, max_total=2),
            Role.PREFILL: prefill_plan.decide(prefill_view, now_s=now_s, max_total=0),
        }
        switch = plan_switch(decisions, views_, limits, min_spare_streak=3)
        if now_s < 12.0:
            assert switch is None  # neither streak is long enough yet
    if switches:
        assert switch is not None
        assert (switch.source, switch.target) == (Role.DECODE, Role.PREFILL)
        assert switch.detail.startswith("prefill at_total (prefill 1.90 s/s per worker >= 0.8")
        # Read unscaled, the same KV would have kept the decode pool from sparing a worker.
        unscaled = pressure(view(Role.DECODE, 2, long_prompts(share, kv_usage)), Thresholds(), None)
        assert not unscaled.is_under
    else:
        assert switch is None


def test_a_floor_on_the_total_holds_an_idle_pool_for_a_switch_instead_of_a_retirement():
    """With the total fixed (floor = cap = 2), an idle prefill worker is not retired: it is
    held (``at_total_min``) until the decode pool asks for a worker, then switched."""
    limits = {Role.DECODE: Limits(1, 2), Role.PREFILL: Limits(0, 1)}
    config = PolicyConfig(up_intervals=1, down_intervals=1, up_cooldown_s=0.0, down_cooldown_s=0.0)
    prefill_plan = PoolPlanner(config, limits[Role.PREFILL])
    held = prefill_plan.decide(view(Role.PREFILL, 1, idle()), now_s=10.0, min_total=1)
    assert (held.desired, held.reason, held.direction) == (1, "at_total_min", -1)
    # Without the floor the same reading retires the worker.
    retired = PoolPlanner(config, limits[Role.PREFILL]).decide(
        view(Role.PREFILL, 1, idle()), now_s=10.0
    )
    assert (retired.desired, retired.reason) == (0, "idle")
    decode = PoolPlanner(config, limits[Role.DECODE]).decide(
        view(Role.DECODE, 1, busy()), now_s=10.0, max_total=1
    )
    assert decode.reason == "at_total"
    switch = plan_switch({Role.DECODE: decode, Role.PREFILL: held}, views(1, 1), limits)
    assert switch is not None
    assert (switch.source, switch.target) == (Role.PREFILL, Role.DECODE)


def test_a_pools_last_worker_is_idle_when_no_request_is_on_it():
    """A prefill worker keeps finished prompts' blocks cached (KV usage above 0): that is no
    work, and its pool may go to zero; a request on it, however small, is."""
    cached = WorkerLoad(kv_usage=0.4, max_num_seqs=8)
    reading = pressure(view(Role.PREFILL, 1, cached), Thresholds(), None)
    assert (reading.is_under, reading.label) == (True, "idle")
    working = WorkerLoad(num_running=1, kv_usage=0.01, max_num_seqs=8)
    reading = pressure(view(Role.PREFILL, 1, working), Thresholds(), None)
    assert (reading.is_under, reading.is_over, reading.label) == (False, False, "ok")


def test_planner_config_refuses_a_floor_above_the_cap():
    with pytest.raises(ValueError, match="min_total_workers"):
        PlannerConfig(max_total_workers=2, min_total_workers=3)


def test_two_pools_never_step_into_the_same_room_under_the_total_cap():
    """Cap 3, one decode and one prefill worker, both busy: one pool gets the third worker,
    the other is held at the cap (it once stepped too, for a total of 4)."""
    config = PlannerConfig(
        max_prefill_workers=2,
        max_decode_workers=2,
        max_total_workers=3,
        up_intervals=1,
        up_cooldown_s=0.0,
        role_switching=False,
    )
    planner = Planner(config, DryRunConnector())
    planner.observer.sync_workers(
        {
            InstanceId("d"): worker("d", WorkerRole.DECODE),
            InstanceId("p"): worker("p", WorkerRole.PREFILL),
        }
    )
    queued = LoadMetrics(
        worker_id=InstanceId("p"),
        num_running=1,
        num_waiting=10,
        num_free_blocks=50,
        num_total_blocks=100,
        kv_usage=0.1,
    )
    planner.observer.record(report("d", num_running=8), now_s=1.0)
    planner.observer.record(queued, now_s=1.0)
    decisions = planner.decide(now_s=1.0)
    assert sum(d.desired for d in decisions.values()) == 3
    assert sorted(d.reason for d in decisions.values())[0] == "at_total"


def test_no_role_switches_with_the_kubernetes_connector():
    assert PlannerConfig().switches_roles
    assert not PlannerConfig(role_switching=False).switches_roles
    # A switched pod would stay in its Deployment: the replicas would say the wrong thing.
    assert not PlannerConfig(connector="kubernetes").switches_roles


def test_the_decode_pool_prefills_locally_only_with_no_prefill_pool_planned():
    for max_prefill_workers, expected in ((0, True), (2, False)):
        config = PlannerConfig(max_prefill_workers=max_prefill_workers)
        p = Planner(config, DryRunConnector())
        p.decide(now_s=10.0)
        assert p.last_views[Role.DECODE].prefills_locally is expected
