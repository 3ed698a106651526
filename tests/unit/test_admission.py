"""Objectives in the pure cores: the waiting queue's order, shedding at the deadline, the
measured speed model, the step budget and the time-to-first-token prediction."""

import math
import random

import pytest

from proto.messages import FinishReason, RequestId, SamplingParams
from shared.engine.scheduler import Scheduler, SchedulerConfig
from shared.engine.sequence import Sequence, SequenceStatus
from shared.engine.speed import (
    SpeedModel,
    StepBudget,
    StepSpeed,
    predict_ttft_s,
    step_budget,
)
from shared.engine.waiting import WaitingQueue


def seq(name: str, n: int = 4, *, priority: int = 0, deadline_s: float | None = None) -> Sequence:
    return Sequence(
        RequestId(name),
        list(range(100, 100 + n)),
        SamplingParams(max_tokens=50),
        priority=priority,
        deadline_s=deadline_s,
    )


def names(seqs) -> list[str]:
    return [s.request_id for s in seqs]


def make_scheduler(**overrides) -> Scheduler:
    config = {"num_kv_blocks": 256, "block_size": 4, "max_num_seqs": 64}
    config.update(overrides)
    return Scheduler(SchedulerConfig(**config))


# --- waiting queue ---------------------------------------------------------------------------


def test_waiting_queue_serves_priority_then_deadline_then_arrival():
    queue = WaitingQueue()
    for s in [
        seq("late-normal", deadline_s=9.0),
        seq("no-deadline"),
        seq("early-normal", deadline_s=3.0),
        seq("low", priority=1, deadline_s=1.0),
        seq("high", priority=-1),
        seq("no-deadline-2"),
    ]:
        queue.push(s)

    assert names(queue) == [
        "high",
        "early-normal",
        "late-normal",
        "no-deadline",
        "no-deadline-2",
        "low",
    ]
    popped = [queue.pop() for _ in range(len(queue))]
    expected = ["high", "early-normal", "late-normal", "no-deadline", "no-deadline-2", "low"]
    assert names(popped) == expected
    assert not queue


def test_waiting_queue_counts_tokens_ahead_by_priority():
    queue = WaitingQueue()
    queue.push(seq("h", 10, priority=-1))
    queue.push(seq("n", 20))
    removed = seq("n2", 5)
    queue.push(removed)
    queue.push(seq("l", 40, priority=1))
    assert queue.remove(removed)
    assert not queue.remove(removed)

    assert queue.num_tokens == 70
    assert queue.num_tokens_ahead(-1) == 10
    assert queue.num_tokens_ahead(0) == 30
    assert queue.num_tokens_ahead(1) == 70
    assert len(queue) == 3


def test_waiting_queue_pops_expired_that_have_not_started():
    queue = WaitingQueue()
    queue.push(seq("soon", deadline_s=1.0))
    queue.push(seq("later", deadline_s=5.0))
    resumed = seq("resumed", deadline_s=0.5)
    resumed.token_ids.append(7)  # a preempted sequence that already streamed a token
    queue.push(resumed)

    assert names(queue.pop_expired(2.0)) == ["soon"]
    assert names(queue) == ["resumed", "later"]
    assert queue.pop_expired(2.0) == []


# --- scheduler -------------------------------------------------------------------------------


def test_scheduler_sheds_waiting_sequences_past_their_deadline():
    scheduler = make_scheduler(max_num_seqs=1)
    first = seq("first", deadline_s=1.0)
    waiting = seq("waiting", deadline_s=2.0)
    scheduler.add(first)
    scheduler.add(waiting)
    plan = scheduler.schedule()  # max_num_seqs=1: only "first" runs
    scheduler.postprocess(plan, [7])

    expired = scheduler.expire(now_s=3.0)

    assert expired == [waiting]
    assert waiting.status is SequenceStatus.FINISHED
    assert waiting.finish_reason is FinishReason.SHED
    assert scheduler.num_waiting == 0
    assert scheduler.get(RequestId("waiting")) is None
    assert scheduler.expire(now_s=100.0) == []  # "first" runs: it is never shed


def test_scheduler_admits_by_priority_and_deadline():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    scheduler.add(seq("normal-late", deadline_s=9.0))
    scheduler.add(seq("normal-early", deadline_s=1.0))
    scheduler.add(seq("high", priority=-1))

    plan = scheduler.schedule()

    assert names(plan.prefill_seqs) == ["high", "normal-early"]


def test_scheduler_budget_caps_the_batch_and_the_prefill_tokens():
    scheduler = make_scheduler(max_num_batched_tokens=1000)
    for i in range(6):
        scheduler.add(seq(f"s{i}", 8))
    scheduler.set_budget(StepBudget(max_num_running=4, max_prefill_tokens=16))

    plan = scheduler.schedule()
    assert names(plan.prefill_seqs) == ["s0", "s1"]  # 16 tokens
    scheduler.postprocess(plan, [7, 7])
    plan = scheduler.schedule()
    assert names(plan.prefill_seqs) == ["s2", "s3"]
    scheduler.postprocess(plan, [7] * len(plan.seqs))
    plan = scheduler.schedule()
    assert plan.num_prefill_seqs == 0  # four running: the cap
    assert scheduler.num_running == 4


def test_scheduler_budget_of_no_tokens_still_starts_a_prompt_when_idle():
    scheduler = make_scheduler()
    scheduler.add(seq("a", 40))
    scheduler.set_budget(StepBudget(max_prefill_tokens=0))

    assert names(scheduler.schedule().prefill_seqs) == ["a"]


# --- speed -----------------------------------------------------------------------------------


def test_speed_model_recovers_the_step_time_of_a_linear_engine():
    rng = random.Random(3)
    truth = StepSpeed(base_s=0.006, per_seq_s=0.0001, per_token_s=0.00002, prefill_base_s=0.005)
    model = SpeedModel()
    for _ in range(500):
        batch = rng.randint(1, 300)
        tokens = rng.choice([0, 0, rng.randint(1, 4000)])
        noise = rng.uniform(0.98, 1.02)
        model.observe(truth.step_s(batch, tokens) * noise, batch, tokens)

    speed = model.speed
    for batch, tokens in [(10, 0), (200, 0), (50, 2000), (300, 4000)]:
        assert speed.step_s(batch, tokens) == pytest.approx(truth.step_s(batch, tokens), rel=0.05)


def test_speed_model_is_unknown_until_it_has_seen_steps():
    model = SpeedModel(min_steps=8)
    assert not model.speed.is_known
    model.observe(0.01, 0, 0)  # an empty step teaches nothing
    model.observe(math.nan, 5, 0)
    assert model.num_steps == 0


def test_speed_model_refits_once_per_refit_steps():
    model = SpeedModel(min_steps=8, refit_steps=4)
    for i in range(8):
        model.observe(0.010 + 0.001 * (i % 2), 10 + i, 0)
    first = model.speed
    assert first.is_known  # fitted as soon as it has min_steps
    for _ in range(3):
        model.observe(0.5, 10, 0)  # a much slower engine: read only at the next refit
        assert model.speed is first
    model.observe(0.5, 10, 0)
    assert model.speed.step_s(10, 0) > first.step_s(10, 0)
    with pytest.raises(ValueError, match="refit_steps"):
        SpeedModel(refit_steps=0)


def test_step_budget_keeps_a_step_within_the_objective():
    speed = StepSpeed(base_s=0.010, per_seq_s=0.0001, per_token_s=0.00002, prefill_base_s=0.005)

    budget = step_budget(speed, tpot_s=0.1, num_running=200)

    assert budget.max_num_running == int((0.08 - 0.010) / 0.0001)
    assert budget.max_prefill_tokens is not None
    assert speed.step_s(200, budget.max_prefill_tokens) == pytest.approx(0.08, abs=1e-4)
    assert step_budget(speed, tpot_s=None, num_running=200) == StepBudget()
    assert step_budget(StepSpeed(), tpot_s=0.1, num_running=0) == StepBudget()


def test_predict_ttft_counts_the_steps_needed_for_the_queue_ahead():
    speed = StepSpeed(base_s=0.010, per_seq_s=0.0, per_token_s=0.0001, prefill_base_s=0.0)

    alone = predict_ttft_s(
        speed, num_running=0, num_tokens_ahead=0, num_own_tokens=100, max_prefill_tokens=1000
    )
    behind = predict_ttft_s(
        speed, num_running=0, num_tokens_ahead=2900, num_own_tokens=100, max_prefill_tokens=1000
    )

    assert alone == pytest.approx(0.010 + 0.01)
    assert behind == pytest.approx(3 * 0.010 + 0.3)
