"""Standby workers: `baton up --planner` keeps a warm, unregistered worker process; a scale-up
hands it over and it serves at once; another takes its place; all stop with the cluster."""

import asyncio
import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import aiohttp
import pytest

from proto import subjects
from proto.messages import InstanceId, ScaleCommand, WorkerInfo, WorkerRole
from services.launcher.cluster import ClusterSpec, local_cluster
from services.launcher.standby import StandbyPool, StandbyWorker
from shared.bus import Bus
from shared.discovery import Discovery
from shared.discovery.watch import WorkerDirectory
from shared.servers import ServerProcess

# The planner decides once a minute: the test sends the scale commands itself.
QUIET_PLANNER = ("--interval-s", "60")


def _by_pid(directory: WorkerDirectory, pid: int) -> WorkerInfo | None:
    return next((i for i in directory.workers.values() if i.pid == pid), None)


async def _until(predicate, timeout_s: float) -> None:
    """Wait for what a child process or the launcher's tasks are about to make true."""
    async with asyncio.timeout(timeout_s):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.05)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(60)
async def test_scale_up_hands_over_a_warm_standby_that_serves_at_once(
    nats_server: ServerProcess, etcd_server: ServerProcess, namespace: str, tmp_path: Path
) -> None:
    spec = ClusterSpec(
        namespace=namespace,
        nats_url=nats_server.url,
        etcd_url=etcd_server.url,
        num_routers=0,
        num_workers=1,
        planner=True,
        max_workers=2,
        planner_args=QUIET_PLANNER,
        log_dir=str(tmp_path),
        log_level="info",
        ready_timeout_s=30.0,
        stop_timeout_s=10.0,
    )
    async with (
        local_cluster(spec) as cluster,
        Bus.connect(nats_server.url) as bus,
        Discovery.connect(etcd_server.url) as discovery,
        discovery.watch_workers(namespace) as directory,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
    ):
        # The launcher makes its standby pool once its planner-following task has started.
        await _until(lambda: cluster.standbys is not None, 20)
        pool = cluster.standbys
        assert pool is not None
        await _until(lambda: any(s.is_warm for s in pool.standbys), 20)
        standby = pool.standbys[0]
        assert standby.name == "decode-1"
        assert _by_pid(directory, standby.proc.pid) is None  # warm, but registered nowhere

        command = ScaleCommand(
            planner_id=InstanceId("test"), role=WorkerRole.DECODE, num_replicas=2, seq=1
        )
        handed_at_s = time.monotonic()
        await bus.publish(subjects.planner_scale(namespace), command)
        async with asyncio.timeout(10):
            await directory.wait_for(lambda: _by_pid(directory, standby.proc.pid) is not None)
            info = _by_pid(directory, standby.proc.pid)
            assert info is not None
            while True:
                async with session.get(f"{info.http_url}/ready") as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.02)
        ready_s = time.monotonic() - handed_at_s
        # A cold start takes 1-3 s here; a standby well under one. Bounded loosely: the
        # machine is shared.
        assert ready_s < 2.0, ready_s
        assert [c.name for c in cluster.children if c.role == "decode"] == ["decode-0", "decode-1"]
        assert len(cluster.workers) == 2

        # The frontend sees both workers, and the pool has started a replacement.
        await _until(lambda: len(pool.standbys) == 1 and pool.standbys[0] is not standby, 10)
        replacement = pool.standbys[0]
        assert replacement.name == "decode-2"
        assert pool.num_taken == 1
        standby_pids = [s.proc.pid for s in pool.standbys]
        assert set(standby_pids) <= set(cluster.pids)
        print(f"standby handed over: ready {ready_s:.2f} s after the scale command")  # noqa: T201

    # Stopped with the cluster: the replacement standby and the worker it became.
    assert replacement.proc.returncode is not None
    assert standby.proc.returncode == 0  # a worker: drained and exited cleanly
    assert not any(_is_running(pid) for pid in [*standby_pids, standby.proc.pid])


@pytest.mark.timeout(60)
async def test_standby_pool_replaces_a_dead_standby_and_hands_over_extra_arguments(
    nats_server: ServerProcess, etcd_server: ServerProcess, namespace: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "BATON_NAMESPACE": namespace,
        "BATON_NATS_URL": nats_server.url,
        "BATON_ETCD_URL": etcd_server.url,
    }

    async def exec_child(
        name: str, command: tuple[str, ...], stdin: socket.socket
    ) -> asyncio.subprocess.Process:
        with open(tmp_path / f"{name}.log", "ab") as log:  # noqa: ASYNC230 - once per process
            return await asyncio.create_subprocess_exec(
                *command, env=env, stdin=stdin.fileno(), stdout=log, stderr=log
            )

    names = iter(f"standby-{i}" for i in range(10))
    pool = StandbyPool(
        size=1,
        worker_args=("--role", "decode", "--model", "first"),
        exec_child=exec_child,
        next_name=lambda: next(names),
        backoff_s=0.1,
    )
    taken: StandbyWorker | None = None
    async with (
        Discovery.connect(etcd_server.url) as discovery,
        discovery.watch_workers(namespace) as directory,
    ):
        running = asyncio.create_task(pool.run())
        try:
            await _until(lambda: bool(pool.standbys) and pool.standbys[0].is_warm, 20)
            dead = pool.standbys[0]
            dead.proc.send_signal(signal.SIGKILL)
            # Replaced under the same name (and log file).
            await _until(lambda: bool(pool.standbys) and pool.standbys[0] is not dead, 10)
            assert pool.standbys[0].name == dead.name == "standby-0"
            await _until(lambda: pool.standbys[0].is_warm, 20)

            taken = pool.take()
            assert taken is not None
            await taken.hand_over(["--model", "second"])  # the last flag wins
            async with asyncio.timeout(10):
                await directory.wait_for(lambda: _by_pid(directory, taken.proc.pid) is not None)
            info = _by_pid(directory, taken.proc.pid)
            assert info is not None
            assert info.model == "second"
            await _until(lambda: bool(pool.standbys), 5)
            left = pool.standbys[0]
            assert left.name == "standby-1"
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
            if taken is not None:
                taken.proc.send_signal(signal.SIGTERM)
                assert await taken.proc.wait() == 0
    # Cancelling the pool stopped the standby it held.
    assert left.proc.returncode is not None
    assert pool.standbys == []
