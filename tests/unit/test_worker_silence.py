"""The frontend presumes a worker dead when its load reports stop, but not when every
worker goes quiet at once (that is the bus, or this process, not the workers)."""

from proto.messages import InstanceId, WorkerInfo, WorkerRole
from services.frontend.worker_pool import WorkerPool


def info(worker_id: str) -> WorkerInfo:
    return WorkerInfo(
        worker_id=InstanceId(worker_id),
        model="m",
        role=WorkerRole.DECODE,
        subject=f"s.{worker_id}",
        max_num_seqs=8,
        num_kv_blocks=64,
    )


def pool_of(*names: str) -> WorkerPool:
    pool = WorkerPool(None, "ns")  # never started, so it needs no bus
    pool.sync({name: info(name) for name in names})
    return pool


def heard(pool: WorkerPool, name: str, at_s: float) -> None:
    state = pool.get(InstanceId(name))
    assert state is not None
    state.last_heard_s = at_s
    state.is_silent = False


def test_a_worker_silent_while_others_report_is_presumed_dead_once():
    pool = pool_of("a", "b")
    heard(pool, "a", 100.0)
    heard(pool, "b", 100.0)
    assert pool.find_silent(0.5, 100.4) == []

    heard(pool, "a", 100.5)
    assert pool.find_silent(0.5, 100.6) == ["b"]
    assert pool.find_silent(0.5, 100.7) == []  # said once
    assert [s.info.worker_id for s in pool.candidates("m")] == ["a"]

    heard(pool, "b", 101.0)  # it reports again: usable again
    assert {s.info.worker_id for s in pool.candidates("m")} == {"a", "b"}


def test_silence_of_every_worker_at_once_proves_nothing():
    pool = pool_of("a", "b")
    heard(pool, "a", 100.0)
    heard(pool, "b", 100.0)
    assert pool.find_silent(0.5, 105.0) == []
    assert len(pool.candidates("m")) == 2


def test_a_worker_that_reports_late_under_load_gets_longer_before_it_is_presumed_dead():
    pool = pool_of("a", "b")
    # "b" answers every 100 ms; "a", busy with big steps, once every 0.8 s.
    for i in range(12):
        pool.heard_from(InstanceId("b"), 100.0 + 0.1 * i)
    for at_s in (100.0, 100.8, 101.6):
        pool.heard_from(InstanceId("a"), at_s)
    pool.heard_from(InstanceId("b"), 102.0)
    assert pool.find_silent(0.5, 102.2) == []  # 0.6 s quiet: in its rhythm, not dead
    pool.heard_from(InstanceId("b"), 103.5)
    pool.heard_from(InstanceId("b"), 103.6)
    assert pool.find_silent(0.5, 104.1) == ["a"]  # 2.5 s: three of its gaps, and more
    # A worker in its usual 100 ms rhythm is found after silence_s, as before.
    pool.heard_from(InstanceId("a"), 104.2)
    for i in range(1, 40):
        pool.heard_from(InstanceId("a"), 104.2 + 0.1 * i)
        pool.heard_from(InstanceId("b"), 104.2 + 0.1 * i)
    assert pool.find_silent(0.5, 108.0) == []
    pool.heard_from(InstanceId("a"), 108.7)
    assert pool.find_silent(0.5, 108.75) == ["b"]
