"""The planner's decision core, driven by synthetic load sequences."""

from dataclasses import replace

import pytest

from services.planner.config import PlannerConfig
from services.planner.policy import Decision, Limits, Mode, PolicyConfig, PoolPlanner
from services.planner.signals import (
    PoolView,
    Role,
    Thresholds,
    WorkerLoad,
    slope_per_s,
    steady_slope_per_s,
)
from shared.slo import SLOConfig

INTERVAL_S = 1.0


def busy(num_waiting: int = 10) -> WorkerLoad:
    """A worker with a full batch and a queue."""
    return WorkerLoad(num_running=8, num_waiting=num_waiting, kv_usage=0.3, max_num_seqs=8)


def idle() -> WorkerLoad:
    return WorkerLoad(max_num_seqs=8)


def pool(n: int, load: WorkerLoad | None, role: Role = Role.DECODE) -> PoolView:
    return PoolView(role=role, num_workers=n, loads=(load,) * n if load else ())


def planner(min_replicas: int = 1, max_replicas: int = 4, **overrides: object) -> PoolPlanner:
    settings: dict[str, object] = {
        "up_intervals": 2,
        "down_intervals": 3,
        "up_cooldown_s": 0.0,
        "down_cooldown_s": 0.0,
        **overrides,
    }
    return PoolPlanner(PolicyConfig(**settings), Limits(min_replicas, max_replicas))  # type: ignore[arg-type]


class Clock:
    """The planner's clock, advanced one interval per decision."""

    def __init__(self) -> None:
        self.now_s = 100.0

    def run(self, p: PoolPlanner, views: list[PoolView]) -> list[Decision]:
        decisions = []
        for view in views:
            decisions.append(p.decide(view, self.now_s))
            self.now_s += INTERVAL_S
        return decisions


def test_load_mode_steps_up_after_up_intervals_of_pressure():
    p, clock = planner(), Clock()
    decisions = clock.run(p, [pool(1, busy())] * 2)
    assert [d.desired for d in decisions] == [1, 2]
    assert decisions[0].reason == "streak"
    assert decisions[1].reason == "queue"
    assert "waiting 10.0/worker" in decisions[1].detail


def test_load_mode_steps_down_after_down_intervals_idle():
    p, clock = planner(), Clock()
    decisions = clock.run(p, [pool(3, idle())] * 4)
    assert [d.desired for d in decisions] == [3, 3, 2, 2]
    assert [d.reason for d in decisions] == ["streak", "streak", "idle", "pending"]


def test_load_mode_holds_while_the_pool_has_not_reached_the_target():
    p, clock = planner(settle_timeout_s=5.0), Clock()
    clock.run(p, [pool(1, busy())] * 2)  # -> 2
    decisions = clock.run(p, [pool(1, busy())] * 4)
    assert {d.reason for d in decisions} == {"pending"}
    # Past the settle timeout it plans from the pool as it is, and asks again.
    later = clock.run(p, [pool(1, busy())] * 2)
    assert [(d.desired, d.reason) for d in later] == [(1, "streak"), (2, "queue")]


def test_load_mode_each_signal_can_trigger_scale_up():
    cases = {
        "kv": WorkerLoad(num_running=1, kv_usage=0.95, max_num_seqs=8),
        "batch": WorkerLoad(num_running=8, max_num_seqs=8),
        "queue": WorkerLoad(num_running=1, num_waiting=5, max_num_seqs=8),
        "wait": WorkerLoad(num_running=1, predicted_wait_s=0.6, max_num_seqs=8),
    }
    for label, load in cases.items():
        p, clock = planner(ttft_s=1.0), Clock()
        decisions = clock.run(p, [pool(1, load)] * 2)
        assert decisions[-1].reason == label, decisions[-1]
        assert decisions[-1].desired == 2


def test_batch_capacity_prefers_the_tpot_cap_over_max_num_seqs():
    capped = WorkerLoad(num_running=4, max_num_running=4, max_num_seqs=64)
    p, clock = planner(), Clock()
    assert clock.run(p, [pool(1, capped)] * 2)[-1].reason == "batch"


def test_flapping_load_never_reaches_a_streak():
    p, clock = planner(up_intervals=3, down_intervals=3), Clock()
    views = [pool(2, busy()), pool(2, idle())] * 10
    decisions = clock.run(p, views)
    assert all(d.desired == 2 for d in decisions)
    assert {d.reason for d in decisions} == {"streak"}


def test_load_between_the_thresholds_holds_steady():
    # 2 workers at 60 % of the batch: not over 90 %, and 1 worker would hold 120 %.
    half = WorkerLoad(num_running=5, max_num_seqs=8)
    p, clock = planner(), Clock()
    decisions = clock.run(p, [pool(2, half)] * 10)
    assert {(d.desired, d.reason) for d in decisions} == {(2, "steady")}


def test_hysteresis_gap_keeps_a_pool_that_would_be_over_after_scaling_down():
    # 40 % on 2 workers is under the 90 % limit, but 80 % on one is above half of it.
    medium = WorkerLoad(num_running=3, max_num_seqs=8)
    p, clock = planner(), Clock()
    assert all(d.reason == "steady" for d in clock.run(p, [pool(2, medium)] * 10))


def test_max_replicas_is_respected():
    p, clock = planner(max_replicas=2), Clock()
    decisions = clock.run(p, [pool(1, busy())] * 2)
    decisions += clock.run(p, [pool(2, busy())] * 6)
    assert max(d.desired for d in decisions) == 2
    assert decisions[-1].reason == "at_max"


def test_min_replicas_is_respected():
    p, clock = planner(min_replicas=2), Clock()
    decisions = clock.run(p, [pool(2, idle())] * 10)
    assert {d.desired for d in decisions} == {2}
    assert decisions[-1].reason == "at_min"


def test_too_few_workers_are_raised_to_the_min_at_once():
    p, clock = planner(min_replicas=2, max_replicas=3), Clock()
    decision = clock.run(p, [pool(1, idle())])[0]
    assert (decision.desired, decision.previous, decision.reason) == (2, 1, "min")


def test_too_many_workers_are_clamped_to_the_max():
    p, clock = planner(max_replicas=2), Clock()
    decision = clock.run(p, [pool(5, busy())])[0]
    assert (decision.desired, decision.previous, decision.reason) == (2, 5, "max")


def test_up_cooldown_spaces_actions():
    p, clock = planner(up_intervals=1, up_cooldown_s=5.0, settle_timeout_s=0.0), Clock()
    decisions = clock.run(p, [pool(1, busy())] + [pool(2, busy())] * 5)
    assert [d.desired for d in decisions] == [2, 2, 2, 2, 2, 3]
    assert [d.reason for d in decisions[1:5]] == ["cooldown"] * 4


def test_down_cooldown_applies_after_a_scale_up():
    p, clock = planner(up_intervals=1, down_intervals=1, down_cooldown_s=4.0), Clock()
    decisions = clock.run(p, [pool(1, busy())] + [pool(2, idle())] * 5)
    assert [d.desired for d in decisions] == [2, 2, 2, 2, 1, 1]
    assert [d.reason for d in decisions[1:4]] == ["cooldown"] * 3
    assert decisions[4].reason == "idle"


def test_step_up_then_down_follows_a_load_step():
    p, clock = planner(up_intervals=2, down_intervals=3), Clock()
    workers = 1
    trace = []
    for load in [busy()] * 8 + [idle()] * 12:
        decision = p.decide(pool(workers, load), clock.now_s)
        workers = decision.desired  # the connector follows at once
        trace.append(workers)
        clock.now_s += INTERVAL_S
    assert trace[:8] == [1, 2, 2, 3, 3, 4, 4, 4]
    assert trace[-1] == 1
    assert trace[8:] == sorted(trace[8:], reverse=True)


def test_dry_run_plans_from_the_pool_it_sees_not_from_its_unmet_target():
    # Nothing follows the decisions: past the settle timeout it asks for one more again.
    p, clock = planner(up_intervals=1, settle_timeout_s=2.0), Clock()
    decisions = clock.run(p, [pool(1, busy())] * 5)
    assert [(d.desired, d.reason) for d in decisions] == [
        (2, "queue"),
        (2, "pending"),
        (2, "queue"),
        (2, "pending"),
        (2, "queue"),
    ]
    assert [d.previous for d in decisions] == [1, 2, 1, 2, 1]


def test_no_reports_hold_and_reset_the_streak():
    p, clock = planner(up_intervals=2), Clock()
    decisions = clock.run(p, [pool(1, busy()), pool(1, None), pool(1, busy())])
    assert [d.reason for d in decisions] == ["streak", "no_reports", "streak"]


def test_sla_mode_sizes_decode_from_demand_over_capacity():
    # 30 sequences, 8 per worker at 70 % utilization: ceil(30 / 5.6) = 6, within max 8.
    p, clock = planner(max_replicas=8, mode=Mode.SLA, up_intervals=1), Clock()
    load = WorkerLoad(num_running=8, num_waiting=7, max_num_seqs=8)
    decision = clock.run(p, [pool(2, load)])[0]
    assert (decision.desired, decision.reason) == (6, "sla")
    assert "30 sequences" in decision.detail


def test_sla_mode_follows_the_trend_ahead_of_demand():
    p = planner(max_replicas=10, mode=Mode.SLA, up_intervals=2, horizon_s=10.0)
    clock = Clock()
    # Demand rising 2 sequences/s: 6 now is 1 worker, but 26 in 10 s needs 5.
    views = [pool(1, WorkerLoad(num_running=n, max_num_seqs=8)) for n in (0, 2, 4, 6)]
    decisions = clock.run(p, views)
    assert decisions[-1].desired == 5
    assert "trend +0.250/s" in decisions[-1].detail  # 2 sequences a second, 8 per worker


def test_sla_mode_reads_a_step_from_nothing_as_no_trend():
    # A load starts: the pool holds 0 sequences, then climbs to 4 over three intervals as
    # its first requests arrive, and stays there. 4 is one worker's worth (8 at 70 %); the
    # plain slope over the window would carry the climb 10 s ahead to 2-4 workers.
    p = planner(max_replicas=10, mode=Mode.SLA, up_intervals=2, horizon_s=10.0)
    counts = (0, 0, 0, 0, 0, 1, 3, 4, 4, 4, 4, 4, 4, 4)
    views = [pool(1, WorkerLoad(num_running=n, max_num_seqs=8)) for n in counts]
    decisions = Clock().run(p, views)
    assert [d.desired for d in decisions] == [1] * len(counts)
    assert all(d.reason == "steady" for d in decisions)


def test_steady_slope_is_what_both_halves_agree_on():
    ramp = [(float(t), 2.0 * t) for t in range(6)]
    assert steady_slope_per_s(ramp) == pytest.approx(2.0)
    # Rising ever faster: the older half's slope, the smallest.
    curve = [(float(t), float(t * t)) for t in range(5)]
    assert steady_slope_per_s(curve) == pytest.approx(slope_per_s(curve[:3]))
    # Rising, then flat at the end: the rise is over.
    assert steady_slope_per_s([(float(t), min(t, 6.0)) for t in range(10)]) == 0.0
    falling = [(float(t), 10.0 - t) for t in range(4)]
    assert steady_slope_per_s(falling) == pytest.approx(-1.0)
    step = [(float(t), v) for t, v in enumerate((0.0, 0.0, 0.0, 2.0, 2.0, 2.0))]
    assert slope_per_s(step) > 0
    assert steady_slope_per_s(step) == 0.0
    # Up then down: no trend; two samples have nothing to compare.
    assert steady_slope_per_s([(0.0, 0.0), (1.0, 3.0), (2.0, 0.0)]) == 0.0
    assert steady_slope_per_s([(0.0, 0.0), (1.0, 3.0)]) == 0.0


def test_sla_mode_sizes_decode_from_arrivals_before_the_batch_fills():
    # A step in the load: each of 2 workers gets 20 requests/s of 30 tokens at 40 ms a step
    # with a full batch, so a request stays 1.2 s and each worker will hold 24 sequences
    # (Little's law), though only 4 run yet. 48 in all, 8 per worker at 70 %: 9, at max 8.
    load = WorkerLoad(
        num_running=4, max_num_seqs=8, arrival_rate=20.0, mean_output_tokens=30.0, full_step_s=0.04
    )
    assert load.sequence_lifetime_s == pytest.approx(1.2)
    p = planner(max_replicas=8, mode=Mode.SLA, up_intervals=1)
    decision = Clock().run(p, [pool(2, load)])[0]
    assert (decision.desired, decision.reason) == (8, "sla")
    assert "8 in the pool, 48 by arrivals" in decision.detail
    # Without an output length seen (or a measured speed) the pool reads as it is: 8 -> 2.
    for unknown in ({"mean_output_tokens": 0.0}, {"full_step_s": 0.0}):
        p = planner(max_replicas=8, mode=Mode.SLA, up_intervals=1)
        decision = Clock().run(p, [pool(2, replace(load, **unknown))])[0]
        assert decision.desired == 2, unknown


def test_sla_mode_keeps_the_sequences_in_the_pool_when_arrivals_stop():
    # The load dropped: no arrivals, but 30 sequences still run; they are the demand.
    load = WorkerLoad(num_running=8, num_waiting=7, max_num_seqs=8, mean_output_tokens=30.0)
    p = planner(max_replicas=8, mode=Mode.SLA, up_intervals=1)
    decision = Clock().run(p, [pool(2, replace(load, full_step_s=0.04))])[0]
    assert decision.desired == 6
    assert "30 in the pool, 0 by arrivals" in decision.detail


def test_sla_mode_scales_down_one_worker_at_a_time():
    p, clock = planner(max_replicas=8, mode=Mode.SLA, down_intervals=2), Clock()
    workers, trace = 4, []
    for _ in range(12):
        decision = p.decide(pool(workers, idle()), clock.now_s)
        workers = decision.desired
        trace.append(workers)
        clock.now_s += INTERVAL_S
    assert trace == [4, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1, 1]


def test_sla_mode_sizes_prefill_from_queued_tokens_and_the_ttft_objective():
    # Each worker clears a token in 1 ms, so 500 tokens within half of a 1 s TTFT objective;
    # 2,000 queued tokens at 70 % -> ceil(2000 / 350) = 6.
    load = WorkerLoad(num_waiting_tokens=1000, wait_per_token_s=0.001)
    p = planner(max_replicas=8, mode=Mode.SLA, up_intervals=1, ttft_s=1.0)
    decision = Clock().run(p, [pool(2, load, Role.PREFILL)])[0]
    assert (decision.desired, decision.reason) == (6, "sla")


def test_sla_mode_sizes_prefill_from_arriving_tokens_with_nothing_queued():
    # A pool that keeps up has no queue between bursts: the arrivals say what it needs.
    # 1,200 tokens/s arriving on each of 2 workers, a 0.5 s window: 1,200 tokens to clear
    # in it; each worker clears 500 -> ceil(1200 / 350) = 4 at 70 %.
    load = WorkerLoad(wait_per_token_s=0.001, prefill_token_rate=1200.0)
    p = planner(max_replicas=8, mode=Mode.SLA, up_intervals=1, ttft_s=1.0)
    decision = Clock().run(p, [pool(2, load, Role.PREFILL)])[0]
    assert (decision.desired, decision.reason) == (4, "sla")


def test_sla_mode_sizes_a_pool_that_prefills_locally_by_its_prompts_too():
    # Decode workers with no prefill pool: few sequences (1 worker's worth) but 1,200 prompt
    # tokens/s arriving on each of 2, where each clears 500 in the 0.5 s window: 4 workers.
    load = WorkerLoad(
        num_running=2, max_num_seqs=8, wait_per_token_s=0.001, prefill_token_rate=1200.0
    )
    view = replace(pool(2, load), prefills_locally=True)
    p = planner(max_replicas=8, mode=Mode.SLA, up_intervals=1, ttft_s=1.0)
    decision = Clock().run(p, [view])[0]
    assert (decision.desired, decision.reason) == (4, "sla")
    assert "prompt tokens" in decision.detail
    # Read as a decode pool alone, the same workers hold their sequences on one.
    p = planner(max_replicas=8, mode=Mode.SLA, up_intervals=1, down_intervals=1, ttft_s=1.0)
    assert Clock().run(p, [pool(2, load)])[0].desired == 1


def test_sla_mode_holds_until_capacity_is_measured():
    p = planner(mode=Mode.SLA, up_intervals=1)
    load = WorkerLoad(num_waiting_tokens=1000)  # no wait_per_token_s yet
    assert Clock().run(p, [pool(1, load, Role.PREFILL)])[0].reason == "no_capacity"


def test_prefill_pool_may_scale_to_zero_when_idle():
    p, clock = planner(min_replicas=0, down_intervals=1), Clock()
    decision = clock.run(p, [pool(1, idle(), Role.PREFILL)])[0]
    assert (decision.desired, decision.reason) == (0, "idle")


def test_slope_is_the_least_squares_fit():
    assert slope_per_s([(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]) == pytest.approx(2.0)
    assert slope_per_s([(0.0, 1.0)]) == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [{"up_intervals": 0}, {"target_utilization": 0.0}, {"trend_window": 1}, {"horizon_s": -1.0}],
)
def test_policy_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        PolicyConfig(**kwargs)


def test_limits_and_thresholds_reject_bad_values():
    with pytest.raises(ValueError, match="min_replicas"):
        Limits(3, 2)
    with pytest.raises(ValueError, match="max_kv_usage"):
        Thresholds(max_kv_usage=1.5)


def test_the_wait_reading_is_over_before_admission_sheds_not_after():
    """Admission sheds a request whose predicted wait passes ``--slo-admit-fraction`` of the
    TTFT objective, so a queue never grows past that: the planner's wait limit is a fraction
    of it. Read against the whole objective, a pool that sheds half its load looks fine."""
    config = PlannerConfig(slo=SLOConfig(slo_ttft_ms=4000, slo_admit_fraction=0.25)).policy()
    assert config.wait_budget_s == pytest.approx(1.0)
    waiting = WorkerLoad(num_running=2, predicted_wait_s=0.6, max_num_seqs=64)
    p, clock = planner(**{"ttft_s": 4.0, "admit_fraction": 0.25, "up_intervals": 1}), Clock()
    [decision] = clock.run(p, [pool(1, waiting)])
    assert (decision.desired, decision.reason) == (2, "wait")
    assert "predicted wait 0.600 s >= 0.5" in decision.detail
    # Without admission's bound the same wait is a third of the way to the old limit (2 s).
    p, clock = planner(**{"ttft_s": 4.0, "up_intervals": 1}), Clock()
    [decision] = clock.run(p, [pool(1, waiting)])
    assert decision.reason == "steady"
    assert PolicyConfig().wait_budget_s is None
    with pytest.raises(ValueError, match="admit_fraction"):
        PolicyConfig(admit_fraction=0.0)
