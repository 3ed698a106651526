"""The idle sweep fails a silent stream only when its worker has gone quiet too (hung or
gone), or after a much longer cap: a live worker may hold the request queued for minutes."""

import math

import pytest

from proto.messages import InstanceId, RequestId, WorkerInfo, WorkerRole
from services.frontend.worker_pool import WorkerPool
from shared.errors import DeadlineExceeded
from shared.streams import StreamDemux, is_idle

IDLE_S = 120.0
MAX_IDLE_S = 600.0


@pytest.mark.parametrize(
    ("silent_s", "worker_quiet_s", "expected"),
    [
        (60.0, math.inf, False),  # not silent long enough, whatever its worker
        (120.0, math.inf, False),  # at the limit, not past it
        (121.0, math.inf, True),  # its worker is gone
        (121.0, 121.0, True),  # its worker hung as long
        (121.0, 0.1, False),  # its worker reports: queued there
        (300.0, 0.1, False),
        (300.0, 119.0, False),  # quiet a while, not the whole idle timeout
        (600.0, 0.1, False),  # at the cap, not past it
        (601.0, 0.1, True),  # past the cap even so
    ],
)
def test_is_idle(silent_s, worker_quiet_s, expected):
    assert is_idle(silent_s, worker_quiet_s, IDLE_S, MAX_IDLE_S) is expected


def test_a_cap_no_longer_than_the_timeout_makes_silence_enough():
    assert is_idle(121.0, 0.1, IDLE_S, IDLE_S)
    assert is_idle(121.0, 0.1, IDLE_S, 0.0)
    assert not is_idle(100.0, 0.1, IDLE_S, 0.0)


def _info(worker_id: str) -> WorkerInfo:
    return WorkerInfo(
        worker_id=InstanceId(worker_id),
        model="m",
        role=WorkerRole.DECODE,
        subject=f"s.{worker_id}",
        max_num_seqs=8,
        num_kv_blocks=64,
    )


def test_pool_tells_how_long_a_worker_has_been_quiet():
    pool = WorkerPool(None, "ns")  # never started, so it needs no bus
    pool.sync({"a": _info("a")})
    pool.heard_from(InstanceId("a"), 100.0)
    assert pool.quiet_s(InstanceId("a"), 102.5) == 2.5
    assert pool.quiet_s(InstanceId("gone"), 102.5) == math.inf


async def test_sweep_keeps_streams_of_a_worker_still_heard_from():
    demux = StreamDemux(None, "inbox")  # never started: the sweep needs no bus
    quiet = {InstanceId("live"): 0.1, InstanceId("hung"): 200.0}
    demux.worker_quiet_s = lambda worker_id: quiet.get(worker_id, math.inf)
    queued = demux.open(RequestId("queued"))
    queued.worker_id = InstanceId("live")
    stuck = demux.open(RequestId("stuck"))
    stuck.worker_id = InstanceId("hung")
    orphan = demux.open(RequestId("orphan"))
    orphan.worker_id = InstanceId("gone")  # removed from the pool
    start_s = queued.last_active_s

    assert demux.fail_idle(IDLE_S, start_s + 60, MAX_IDLE_S) == 0
    assert demux.fail_idle(IDLE_S, start_s + 121, MAX_IDLE_S) == 2
    for stream in (stuck, orphan):
        with pytest.raises(DeadlineExceeded, match="nothing else from it"):
            await stream.get()
    demux.close(stuck.request_id)
    demux.close(orphan.request_id)

    assert demux.fail_idle(IDLE_S, start_s + 500, MAX_IDLE_S) == 0  # still queued
    assert demux.fail_idle(IDLE_S, start_s + 601, MAX_IDLE_S) == 1  # the cap
    with pytest.raises(DeadlineExceeded, match=r"worker live for 600\.0 s, though it is alive"):
        await queued.get()


async def test_without_a_view_of_workers_silence_alone_fails_a_stream():
    demux = StreamDemux(None, "inbox")
    stream = demux.open(RequestId("r"))
    stream.worker_id = InstanceId("w")
    assert demux.fail_idle(IDLE_S, stream.last_active_s + 121) == 1
