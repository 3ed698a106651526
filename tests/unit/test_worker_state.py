"""A frontend's view of one worker: its last load report, what was sent it since, and what a
refusal since then said."""

import pytest

from proto.messages import InstanceId, LoadMetrics, WorkerInfo, WorkerRole
from services.frontend.worker_pool import WorkerState


def report(predicted_wait_s: float, wait_per_token_s: float = 0.001) -> LoadMetrics:
    return LoadMetrics(
        worker_id=InstanceId("w"),
        num_running=4,
        num_waiting=2,
        num_free_blocks=10,
        num_total_blocks=100,
        kv_usage=0.9,
        predicted_wait_s=predicted_wait_s,
        wait_per_token_s=wait_per_token_s,
    )


def state() -> WorkerState:
    info = WorkerInfo(
        worker_id=InstanceId("w"),
        model="m",
        role=WorkerRole.DECODE,
        subject="s.w",
        max_num_seqs=8,
        num_kv_blocks=100,
    )
    worker = WorkerState(info, now_s=0.0)
    worker.take_report(report(0.5))
    return worker


def test_the_prediction_adds_what_was_sent_since_the_report():
    worker = state()
    assert worker.predicted_wait_s(100) == pytest.approx(0.5 + 0.1)
    worker.sent_since_report = 3
    assert worker.predicted_wait_s(100) == pytest.approx(0.5 + 0.4)


def test_a_refusal_raises_the_prediction_until_the_next_report():
    worker = state()
    # Refused a 200-token prompt for a wait over 1.5 s: the queue ahead is at least 1.3 s.
    worker.note_refusal(1.5, num_tokens=200)
    assert worker.refused_wait_s == pytest.approx(1.3)
    assert worker.predicted_wait_s(100) == pytest.approx(1.4)
    worker.note_refusal(1.0, num_tokens=200)  # a smaller bound says nothing new
    assert worker.predicted_wait_s(100) == pytest.approx(1.4)
    # A prompt whose own prefill alone passes the bound says nothing of the queue.
    fresh = state()
    fresh.note_refusal(0.1, num_tokens=500)
    assert fresh.predicted_wait_s(100) == pytest.approx(0.6)
    # The next report is the worker's own view again.
    worker.take_report(report(0.2))
    assert worker.refused_wait_s == 0.0
    assert worker.predicted_wait_s(100) == pytest.approx(0.3)
