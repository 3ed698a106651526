"""A frontend's prediction of a worker's wait counts what was sent it since its last load
report: this process's own sends, and the other senders' recent rate (read from the
worker's arrival counter) over the time since the report."""

import gc
import time
from collections.abc import AsyncGenerator

import pytest

from proto.messages import (
    InstanceId,
    LoadMetrics,
    RequestId,
    SamplingParams,
    TokenChunk,
    WorkerInfo,
    WorkerRole,
)
from services.frontend.generate import FrontendShed, Generator, SendingShed
from services.frontend.objectives import RequestObjectives
from services.frontend.worker_pool import MAX_UNREPORTED_S, Passed, WorkerPool, WorkerState
from shared.streams import StreamDemux

TOKENS = 200
PER_TOKEN_S = 0.0001  # 20 ms of prefill per 200-token request


def report(num_arrived: int, predicted_wait_s: float = 0.1) -> LoadMetrics:
    return LoadMetrics(
        worker_id=InstanceId("w"),
        num_running=0,
        num_waiting=0,
        num_free_blocks=64,
        num_total_blocks=64,
        kv_usage=0.0,
        predicted_wait_s=predicted_wait_s,
        wait_per_token_s=PER_TOKEN_S,
        num_arrived=num_arrived,
    )


def worker() -> WorkerState:
    info = WorkerInfo(
        worker_id=InstanceId("w"),
        model="m",
        role=WorkerRole.DECODE,
        subject="s.w",
        max_num_seqs=8,
        num_kv_blocks=64,
    )
    return WorkerState(info, now_s=100.0)


def generator_on_one_worker(predicted_wait_s: float) -> tuple[Generator, WorkerState]:
    """A frontend's generator whose one worker last reported ``predicted_wait_s``. Neither
    has a bus (never started): a request that got as far as being sent fails on it."""
    pool = WorkerPool(None, "ns")
    info = worker().info
    pool.sync({"w": info})
    state = pool.get(info.worker_id)
    assert state is not None
    state.reported(report(0, predicted_wait_s=predicted_wait_s), time.monotonic())
    generator = Generator(
        None, StreamDemux(None, "inbox"), pool, "ns", admission_timeout_s=1.0, admit_fraction=0.25
    )
    return generator, state


def request(
    generator: Generator,
    request_id: str,
    objectives: RequestObjectives,
    passed: Passed | None = None,
) -> AsyncGenerator[list[TokenChunk], None]:
    """A TOKENS-token request due in 2 s, placed as it is first iterated."""
    return generator.generate(
        RequestId(request_id),
        "m",
        list(range(TOKENS)),
        SamplingParams(max_tokens=4),
        objectives,
        deadline_s=time.monotonic() + 2.0,
        passed=passed,
    )


def test_alone_it_counts_its_own_sends_as_before():
    state = worker()
    state.reported(report(0), 100.0)
    for i in range(1, 6):  # every arrival was its own
        state.sent_since_report = 10
        state.reported(report(10 * i), 100.0 + 0.1 * i)
    assert state.others_per_s == 0.0
    state.sent_since_report = 3
    # 0.1 s reported, then 3 sent since and this one: 4 prefills of 20 ms.
    assert state.predicted_wait_s(TOKENS, 100.55) == pytest.approx(0.1 + 4 * 0.02)


def test_the_other_senders_rate_is_carried_forward_from_the_report():
    state = worker()
    state.reported(report(0), 100.0)
    # Each 100 ms it sends 10 and the worker counts 40: three others send 300 a second.
    for i in range(1, 9):
        state.sent_since_report = 10
        state.reported(report(40 * i), 100.0 + 0.1 * i)
    assert state.others_per_s == pytest.approx(300.0, rel=0.01)
    report_s = 100.8
    assert state.predicted_wait_s(TOKENS, report_s) == pytest.approx(0.1 + 0.02)
    state.sent_since_report = 2
    # 50 ms after the report: 2 of its own, about 15 of the others', and this one.
    assert state.predicted_wait_s(TOKENS, report_s + 0.05) == pytest.approx(
        0.1 + (2 + 15 + 1) * 0.02, rel=0.01
    )
    # A report that does not come does not make the worker ever busier.
    late = state.predicted_wait_s(TOKENS, report_s + 60.0)
    assert late == pytest.approx(0.1 + (2 + 300 * MAX_UNREPORTED_S + 1) * 0.02, rel=0.01)
    # The load jumps: 20 ms after the report it has sent 8 and let 2 more through, where 2
    # would be usual. The others' rate would say 6; three times its own 10 says 30.
    state.sent_since_report = 8
    state.passed = 2
    assert state.predicted_wait_s(TOKENS, report_s + 0.02) == pytest.approx(
        0.1 + (10 + 30 + 1) * 0.02, rel=0.01
    )


def test_the_rate_follows_the_others_down_and_ignores_a_counter_that_went_back():
    state = worker()
    state.reported(report(0), 100.0)
    state.reported(report(100), 100.1)
    assert state.others_per_s == pytest.approx(500.0)  # half of 1,000 a second, smoothed
    for i in range(2, 12):  # the others stop
        state.reported(report(100), 100.0 + 0.1 * i)
    assert state.others_per_s < 1.0
    rate = state.others_per_s
    state.reported(report(5), 101.3)  # a counter that went back: no new reading
    assert state.others_per_s == rate
    assert state.sent_since_report == 0


async def test_a_request_the_sends_since_its_check_would_make_late_is_shed_unsent():
    """The check before tokenizing passes; by the time the request is tokenized and would
    be sent, more went to the worker: it is answered 429 there, without a bus message (the
    generator here has no bus; sending would fail on it)."""
    generator, state = generator_on_one_worker(predicted_wait_s=0.3)
    objectives = RequestObjectives(ttft_s=2.0, tpot_s=0.1)
    # 2 s at a quarter, less the frontend's margin: 375 ms; 300 + 20 ms of its own prefill.
    passed = generator.check_capacity("m", objectives, TOKENS, budget_s=2.0)
    assert passed is not None
    assert state.passed == 1  # counted until it is sent
    # The next check counts it: 300 + 40 ms, still in.
    second = generator.check_capacity("m", objectives, TOKENS, budget_s=2.0)
    assert second is not None
    second.release()
    second.release()  # once only
    assert state.passed == 1
    # As it is sent it is checked at the worker's own bound (500 ms): 200 ms more is over.
    state.sent_since_report = 10
    chunks = request(generator, "r", objectives, passed)
    with pytest.raises(SendingShed, match="ms from a first token"):
        await anext(chunks)
    assert state.sent_since_report == 10  # not sent
    assert state.in_flight == 0
    assert state.passed == 0
    with pytest.raises(FrontendShed):  # and the first check sheds the next one
        generator.check_capacity("m", objectives, TOKENS, budget_s=2.0)
    # High priority is the worker's to decide: it is sent (and fails here, on no bus).
    urgent = RequestObjectives(ttft_s=2.0, tpot_s=0.1, priority=-1)
    chunks = request(generator, "r2", urgent)
    with pytest.raises(AttributeError):
        await anext(chunks)
    assert state.sent_since_report == 11


async def test_sheds_leave_no_garbage_cycles():
    """A shed is answered thousands of times a second under overload: neither check may
    leave its exception in a reference cycle (a frame holding what it raised), which only
    the garbage collector frees, in pauses of tens of milliseconds at that rate."""
    generator, state = generator_on_one_worker(predicted_wait_s=0.45)
    objectives = RequestObjectives(ttft_s=2.0, tpot_s=0.1)
    gc.collect()
    gc.disable()
    try:
        for i in range(50):
            with pytest.raises(FrontendShed):  # 470 ms against 375
                generator.check_capacity("m", objectives, TOKENS, budget_s=2.0)
            # Passed the first check (a cheaper guess), over the worker's bound when sent.
            state.sent_since_report = 3
            chunks = request(generator, f"r{i}", objectives)
            with pytest.raises(SendingShed):
                await anext(chunks)
            await chunks.aclose()
        assert gc.collect() < 50  # a cycle per shed would be hundreds of objects
    finally:
        gc.enable()


def test_at_a_low_rate_its_own_count_is_not_read_as_a_jump():
    """Sending one request every third report, one send is noise, not a threefold jump:
    the others' share stays their rate."""
    state = worker()
    state.reported(report(0), 100.0)
    arrived = 0
    for i in range(1, 13):
        state.sent_since_report = 1 if i % 3 == 0 else 0
        arrived += state.sent_since_report + 1  # and one from the others each time
        state.reported(report(arrived), 100.0 + 0.1 * i)
    assert state.others_per_s == pytest.approx(10.0, rel=0.01)
    state.sent_since_report = 1
    # 10 ms after the report: 1 of its own, 0.1 of the others', and this one.
    assert state.predicted_wait_s(TOKENS, 101.21) == pytest.approx(
        0.1 + (1 + 0.1 + 1) * 0.02, rel=0.01
    )
