"""`baton up` as a user runs it: a SIGKILLed worker is restarted and the cluster keeps serving;
SIGTERM still stops everything and exits 0."""

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import psutil
import pytest

from services.launcher.cluster import ClusterSpec, LocalCluster, local_cluster
from shared.servers import free_port

MODEL = "baton-sim"
POLL_S = 0.2


def decode_workers(launcher: psutil.Process) -> dict[int, psutil.Process]:
    """The launcher's decode worker processes, by pid."""
    found = {}
    for child in launcher.children():
        with contextlib.suppress(psutil.Error):  # it may be exiting
            cmdline = child.cmdline()
            if "--role" in cmdline and "decode" in cmdline[cmdline.index("--role") + 1 :][:1]:
                found[child.pid] = child
    return found


async def ready_workers(session: aiohttp.ClientSession, url: str) -> int | None:
    """How many workers the frontend's /ready counts; None while it is not ready."""
    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
        async with session.get(f"{url}/ready") as resp:
            body = await resp.json()
            return int(body["workers"]) if body.get("ready") else None
    return None


async def is_registered(session: aiohttp.ClientSession, worker: psutil.Process) -> bool:
    """Whether the worker's own /ready says it is registered (tried on each port it listens
    on: its HTTP port is not known from outside)."""
    with contextlib.suppress(psutil.Error):
        ports = [c.laddr.port for c in worker.net_connections("tcp") if c.status == "LISTEN"]
        for port in ports:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
                async with session.get(f"http://127.0.0.1:{port}/ready") as resp:
                    if resp.status == 200 and (await resp.json()).get("role") == "decode":
                        return True
    return False


async def complete(session: aiohttp.ClientSession, url: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        reply = await resp.text()
        assert resp.status == 200, reply
    assert '"finish_reason"' in reply


async def test_baton_up_restarts_a_killed_worker_and_keeps_serving(tmp_path: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "launcher.log"
    args = ["up", "--port", str(port), "--num-workers", "2", "--log-dir", str(tmp_path / "logs")]
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.launcher",
            *args,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    assert proc.stdout is not None
    launcher = psutil.Process(proc.pid)
    seen: set[psutil.Process] = set()  # every process the launcher ran, to check they are gone
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            async with asyncio.timeout(60):  # start-up (the launcher's own deadline is 60 s)
                # Up once the launcher says so, having seen every frontend process ready: a
                # worker killed before then fails the start-up, which supervision never sees.
                line = await proc.stdout.readline()
                assert b"Baton is up" in line, log_path.read_text()
                while await ready_workers(session, url) != 2:
                    assert proc.returncode is None, log_path.read_text()
                    await asyncio.sleep(POLL_S)
            await complete(session, url)
            before = decode_workers(launcher)
            assert len(before) == 2
            victim = next(iter(before.values()))
            seen |= set(launcher.children(recursive=True))
            victim.send_signal(signal.SIGKILL)

            # Within 30 s: a new decode worker (another pid) is registered and the frontend
            # counts 2 workers again, so the dead one's lease (10 s) has expired too. The
            # launcher stays up and every completion meanwhile succeeds.
            async with asyncio.timeout(30):
                while True:
                    assert proc.returncode is None, log_path.read_text()
                    await complete(session, url)
                    now = decode_workers(launcher)
                    seen |= set(now.values())
                    new = [w for pid, w in now.items() if pid not in before]
                    if (
                        len(now) == 2
                        and victim.pid not in now
                        and len(new) == 1
                        and await is_registered(session, new[0])
                        and await ready_workers(session, url) == 2
                    ):
                        break
                    await asyncio.sleep(POLL_S)
            await complete(session, url)

        text = log_path.read_text()
        # The new worker appended to the log of the one it replaced.
        starts = [
            p.read_text().count("worker http ready") for p in (tmp_path / "logs").glob("decode-*")
        ]
        assert sorted(starts) == [1, 2]
        assert re.search(r"decode-\d exited with code -9 .*restarting in .* \(attempt 1\)", text)
        assert re.search(r"decode-\d restarted pid=\d+ \(attempt 1\)", text)
        seen |= set(launcher.children(recursive=True))
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            assert await proc.wait() == 0, log_path.read_text()
        _, alive = await asyncio.to_thread(psutil.wait_procs, list(seen), 5)
        assert not alive
    finally:  # leave nothing running, also when an assertion failed above
        if proc.returncode is None:
            with contextlib.suppress(psutil.Error):
                seen |= set(launcher.children(recursive=True))
            proc.kill()
            await proc.wait()
        for child in seen:
            with contextlib.suppress(psutil.Error):
                child.kill()


async def test_supervised_cluster_restarts_its_servers_on_their_ports():
    # No log_dir: shared.servers.start_nats/start_etcd leave their log file open (a
    # ResourceWarning, an error under pytest).
    spec = ClusterSpec(
        num_workers=1,
        num_routers=0,
        log_level="warning",
        ready_timeout_s=30.0,
        stop_timeout_s=15.0,
        supervise=True,
        restart_backoff_s=0.1,
    )
    async with local_cluster(spec) as cluster:
        urls = (cluster.nats_url, cluster.etcd_url)
        killed = [s.proc.pid for s in cluster.servers] + [cluster.frontend.pid]
        for pid in killed:
            psutil.Process(pid).send_signal(signal.SIGKILL)
        async with asyncio.timeout(30):
            for name in ("nats", "etcd", "frontend"):
                await cluster.wait_restarted(name)
        assert (cluster.servers[0].url, cluster.servers[1].url) == urls
        assert not set(killed) & set(cluster.pids)
        # The worker reconnects to both servers, the new frontend finds it: serving again.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            async with asyncio.timeout(30):
                while True:
                    with contextlib.suppress(AssertionError, aiohttp.ClientError):
                        await complete(session, cluster.url)
                        break
                    await asyncio.sleep(POLL_S)
    assert min(cluster.restarts[name] for name in ("nats", "etcd", "frontend")) == 1


async def test_restart_backoff_doubles_to_its_cap_and_resets_after_a_long_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """The policy alone, on stand-in processes: backoff 0.5 s doubling to 10 s, a failed restart
    tried again later, back to 0.5 s after a process stayed up ``restart_reset_s``."""
    real_sleep = asyncio.sleep
    delays: list[float] = []

    async def sleep(delay: float) -> None:  # records the backoff instead of waiting it out
        delays.append(delay)
        await real_sleep(0)

    ups = iter([0.0] * 6 + [0.3, 0.0])  # how long each stand-in process stays up, in s
    attempts = 0

    async def wait() -> int:
        up_s = next(ups, None)
        if up_s is None:
            await asyncio.Event().wait()  # the last one stays up until cancelled
        await real_sleep(up_s or 0.0)
        return 1

    async def restart() -> int:
        nonlocal attempts
        attempts += 1
        if attempts == 3:
            raise OSError("no more processes")
        return 1000 + attempts

    cluster = LocalCluster(ClusterSpec(supervise=True, restart_reset_s=0.2))
    monkeypatch.setattr(asyncio, "sleep", sleep)
    supervising = asyncio.create_task(cluster._supervise("decode-0", wait, restart))
    try:
        async with asyncio.timeout(10):
            await cluster.wait_restarted("decode-0", 8)
    finally:
        supervising.cancel()
        await asyncio.wait([supervising])
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 0.5, 1.0]
    assert cluster.restarts == {"decode-0": 8}
    assert "decode-0 failed to restart (no more processes); restarting in 4.0 s (attempt 4)" in (
        caplog.text
    )
    assert "decode-0 restarted pid=1008 (attempt 1)" in caplog.text
