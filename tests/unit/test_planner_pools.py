"""The planner's view of the pools, and the launcher's reconciliation to its targets."""

import asyncio

import msgspec
import pytest

from proto.messages import InstanceId, LoadMetrics, ScaleCommand, WorkerInfo, WorkerRole
from services.launcher.scaler import ScaledPool, WorkerScaler
from services.planner.observer import PoolObserver
from services.planner.signals import Role


def info(worker_id: str, role: WorkerRole = WorkerRole.DECODE, **kw) -> WorkerInfo:
    return WorkerInfo(
        worker_id=InstanceId(worker_id),
        model="m",
        role=role,
        subject=f"s.{worker_id}",
        max_num_seqs=8,
        num_kv_blocks=100,
        **kw,
    )


def load(worker_id: str, num_waiting: int = 0, **kw) -> LoadMetrics:
    return LoadMetrics(
        worker_id=InstanceId(worker_id),
        num_running=2,
        num_waiting=num_waiting,
        num_free_blocks=50,
        num_total_blocks=100,
        kv_usage=0.5,
        **kw,
    )


def test_view_counts_serving_workers_and_their_fresh_reports_only():
    observer = PoolObserver(stale_s=1.0)
    observer.sync_workers(
        {
            InstanceId("a"): info("a"),
            InstanceId("b"): info("b"),
            InstanceId("c"): info("c", is_draining=True),
            InstanceId("p"): info("p", WorkerRole.PREFILL),
            InstanceId("g"): info("g", WorkerRole.AGGREGATED),
        }
    )
    observer.record(load("a", num_waiting=3), now_s=10.0)
    observer.record(load("b"), now_s=8.0)  # stale at 10.5
    observer.record(load("c"), now_s=10.0)  # draining
    observer.record(load("g", is_draining=True), now_s=10.0)  # says it drains
    decode = observer.view(Role.DECODE, now_s=10.5)
    assert decode.num_workers == 3  # a, b, g
    assert [(w.num_waiting, w.max_num_seqs) for w in decode.loads] == [(3, 8)]
    assert observer.view(Role.PREFILL, now_s=10.5).num_workers == 1


def test_reports_of_workers_that_left_are_forgotten():
    observer = PoolObserver(stale_s=1.0)
    observer.sync_workers({InstanceId("a"): info("a")})
    observer.record(load("a"), now_s=1.0)
    observer.sync_workers({})
    observer.sync_workers({InstanceId("a"): info("a")})
    assert observer.view(Role.DECODE, now_s=1.0).loads == ()


def command(n: int, role: WorkerRole = WorkerRole.DECODE) -> ScaleCommand:
    return ScaleCommand(planner_id=InstanceId("p"), role=role, num_replicas=n, reason="test")


async def test_scaler_reconciles_each_pool_to_its_target_within_its_limits():
    pools: dict[str, list[str]] = {"decode": ["d0"], "prefill": ["p0"]}
    retired: list[str] = []

    def make(role: WorkerRole, name: str, lo: int, hi: int) -> ScaledPool:
        workers = pools[name]

        async def start() -> None:
            workers.append(f"{name[0]}{len(workers) + len(retired)}")

        async def retire() -> None:
            retired.append(workers.pop())

        return ScaledPool(role, lo, hi, lambda: len(workers), start, retire)

    scaler = WorkerScaler(
        [make(WorkerRole.DECODE, "decode", 1, 3), make(WorkerRole.PREFILL, "prefill", 1, 2)]
    )
    scaler.on_command(command(5))
    await asyncio.wait_for(scaler.reconcile(), 1.0)
    assert pools["decode"] == ["d0", "d1", "d2"]
    scaler.on_command(command(0))
    await asyncio.wait_for(scaler.reconcile(), 1.0)
    assert (pools["decode"], retired) == (["d0"], ["d2", "d1"])
    scaler.on_command(command(9, WorkerRole.PREFILL))
    await asyncio.wait_for(scaler.reconcile(), 1.0)
    assert pools == {"decode": ["d0"], "prefill": ["p0", "p3"]}
    assert scaler.pools[WorkerRole.PREFILL].target == 2
    assert scaler.pools[WorkerRole.DECODE].target == 1


async def test_scaler_acts_only_on_the_pool_commanded():
    """A role switch moves a worker between the pools without a command: the other pool's
    old target is stale, and a command for one pool must not act on it."""
    pools: dict[str, list[str]] = {"decode": ["d0"], "prefill": ["p0"]}
    started: list[str] = []

    def make(role: WorkerRole, name: str) -> ScaledPool:
        async def start() -> None:
            started.append(name)
            pools[name].append(name)

        async def retire() -> None:
            pools[name].pop()

        return ScaledPool(role, 0, 2, lambda: len(pools[name]), start, retire)

    scaler = WorkerScaler([make(WorkerRole.DECODE, "decode"), make(WorkerRole.PREFILL, "prefill")])
    scaler.on_command(command(1, WorkerRole.PREFILL))
    await asyncio.wait_for(scaler.reconcile(), 1.0)
    pools["decode"].append(pools["prefill"].pop())  # the prefill worker switched to decode
    scaler.on_command(command(2))  # what the planner's decode target is after the switch
    await asyncio.wait_for(scaler.reconcile(), 1.0)
    assert started == []
    assert pools == {"decode": ["d0", "p0"], "prefill": []}
    # The same target again still reconciles: the pool is not what it was when it was set.
    scaler.on_command(command(1, WorkerRole.PREFILL))
    await asyncio.wait_for(scaler.reconcile(), 1.0)
    assert started == ["prefill"]


async def test_scaler_ignores_a_pool_it_does_not_run(caplog):
    scaler = WorkerScaler([])
    scaler.on_command(command(3, WorkerRole.PREFILL))
    scaler.on_command(command(4, WorkerRole.PREFILL))
    await asyncio.wait_for(scaler.reconcile(), 1.0)
    assert [r.message for r in caplog.records].count(
        "scale command ignored role=prefill: this cluster has no such pool to scale"
    ) == 1


def test_a_pool_needs_sane_limits():
    async def nothing() -> None:
        return None

    with pytest.raises(ValueError, match="min_workers <= max_workers"):
        ScaledPool(WorkerRole.DECODE, 3, 2, lambda: 0, nothing, nothing)


def arrivals(worker_id: str, num: int, tokens: int) -> LoadMetrics:
    return LoadMetrics(
        worker_id=InstanceId(worker_id),
        num_running=0,
        num_waiting=0,
        num_free_blocks=10,
        num_total_blocks=10,
        kv_usage=0.0,
        num_arrived=num,
        num_arrived_prefill_tokens=tokens,
    )


def test_observer_measures_each_workers_arrival_rate_over_its_recent_reports():
    observer = PoolObserver(stale_s=10.0)
    observer.sync_workers({InstanceId("a"): info("a")})
    observer.record(arrivals("a", 0, 0), now_s=0.0)
    assert observer.arrival_rates(InstanceId("a")) == (0.0, 0.0)  # one report: no rate yet
    for second in range(1, 7):
        observer.record(arrivals("a", 10 * second, 1000 * second), now_s=float(second))
    assert observer.arrival_rates(InstanceId("a")) == pytest.approx((10.0, 1000.0))
    [load] = observer.view(Role.DECODE, now_s=6.0).loads
    assert (load.arrival_rate, load.prefill_token_rate) == pytest.approx((10.0, 1000.0))
    # The rate follows the recent window: the load stops, the rate falls to 0 within it.
    for second in range(7, 11):
        observer.record(arrivals("a", 60, 6000), now_s=float(second))
    assert observer.arrival_rates(InstanceId("a")) == (0.0, 0.0)
    # A worker whose counters went back (a new run) starts over.
    observer.record(arrivals("a", 1, 10), now_s=11.0)
    assert observer.arrival_rates(InstanceId("a")) == (0.0, 0.0)


def finishes(num: int, tokens: int, **speed: float) -> LoadMetrics:
    return msgspec.structs.replace(
        arrivals("a", 0, 0), num_finished=num, num_finished_output_tokens=tokens, **speed
    )


def test_observer_reads_the_output_length_seen_and_the_full_batch_step():
    observer = PoolObserver(stale_s=10.0)
    observer.sync_workers({InstanceId("a"): info("a")})
    assert observer.mean_output_tokens(InstanceId("a")) == 0.0  # nothing reported
    observer.record(finishes(0, 0), now_s=0.0)
    assert observer.mean_output_tokens(InstanceId("a")) == 0.0  # nothing finished yet
    observer.record(finishes(2, 200), now_s=1.0)
    # Fewer than MIN_FINISHED in the window: the mean over all it finished.
    assert observer.mean_output_tokens(InstanceId("a")) == pytest.approx(100.0)
    # Later requests are shorter: the window says so once enough finished in it.
    for second in range(2, 8):
        observer.record(finishes(2 + 10 * (second - 1), 200 + 300 * (second - 1)), float(second))
    assert observer.mean_output_tokens(InstanceId("a")) == pytest.approx(30.0)
    speed = {"step_base_s": 0.01, "step_per_seq_s": 0.001}
    observer.record(finishes(72, 2_300, **speed), now_s=8.0)
    [load] = observer.view(Role.DECODE, now_s=8.0).loads
    assert load.mean_output_tokens == pytest.approx(30.0)
    capacity = info("a").max_num_seqs
    assert load.full_step_s == pytest.approx(0.01 + 0.001 * capacity)
