"""The planner end to end: `baton up --planner` grows the decode pool under load and shrinks
it by draining once the load is gone, and no request fails on the way."""

import asyncio
import re
import time
from pathlib import Path

import aiohttp
import pytest

from proto.messages import WorkerRole
from services.launcher.cluster import ClusterSpec, LocalCluster, local_cluster
from shared.discovery import Discovery
from shared.discovery.watch import WorkerDirectory
from shared.servers import ServerProcess

MODEL = "baton-sim"

# Aggressive on purpose: decide twice a second, act on two readings in a row going up and
# four going down, and a worker with more than one request queued is over.
PLANNER_ARGS = (
    "--interval-s", "0.5",
    "--up-intervals", "2",
    "--down-intervals", "4",
    "--up-cooldown-s", "0",
    "--down-cooldown-s", "2",
    "--max-waiting", "1",
    "--log-level", "info",
)  # fmt: skip


def _serving(directory: WorkerDirectory) -> int:
    return sum(
        1
        for info in directory.workers.values()
        if info.role is WorkerRole.DECODE and not info.is_draining
    )


async def _client(
    session: aiohttp.ClientSession, cluster: LocalCluster, stop: asyncio.Event, results: list[str]
) -> None:
    """Send requests one after another until ``stop``; record each outcome."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "scale me"}],
        "max_tokens": 48,
        "ignore_eos": True,
    }
    while not stop.is_set():
        async with session.post(f"{cluster.api}/chat/completions", json=body) as resp:
            payload = await resp.json()
            ok = resp.status == 200 and payload["usage"]["completion_tokens"] == 48
            results.append("ok" if ok else f"{resp.status} {payload}")


async def _metric(session: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    match = re.search(rf"^{name}\{{{selector}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.mark.timeout(120)
async def test_planner_scales_decode_up_under_load_and_down_by_draining(
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
        planner_args=PLANNER_ARGS,
        decode_args=("--max-num-seqs", "4", "--drain-timeout-s", "30"),
        log_dir=str(tmp_path),
        log_level="warning",
        ready_timeout_s=30.0,
        stop_timeout_s=15.0,
    )
    heavy_stop, light_stop = asyncio.Event(), asyncio.Event()
    results: list[str] = []
    async with (
        local_cluster(spec) as cluster,
        Discovery.connect(etcd_server.url) as discovery,
        discovery.watch_workers(namespace) as directory,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
    ):
        planner_url = cluster.planner_urls[0]
        assert _serving(directory) == 1
        # Twelve clients against one worker that runs four at a time: a queue forms.
        started_s = time.monotonic()
        heavy = [
            asyncio.create_task(_client(session, cluster, heavy_stop, results)) for _ in range(12)
        ]
        light = []
        try:
            async with asyncio.timeout(30):
                await directory.wait_for(lambda: _serving(directory) == 2)
            up_s = time.monotonic() - started_s
            assert len(cluster.workers) == 2
            await asyncio.sleep(1.0)  # both serve the load for a while
            num_at_peak = len(results)
            # The load goes; one client stays, so the worker that drains may hold a request.
            heavy_stop.set()
            stopped_s = time.monotonic()
            light.append(asyncio.create_task(_client(session, cluster, light_stop, results)))
            await asyncio.gather(*heavy)
            async with asyncio.timeout(30):
                await directory.wait_for(lambda: _serving(directory) == 1)
                retiring = [c for c in [*cluster.children, *cluster.retired] if c.is_retiring]
                assert [c.name for c in retiring] == ["decode-1"]
                assert await retiring[0].proc.wait() == 0
            down_s = time.monotonic() - stopped_s
            light_stop.set()
            await asyncio.gather(*light)
        finally:
            heavy_stop.set()
            light_stop.set()
            await asyncio.gather(*heavy, *light, return_exceptions=True)

        # The worker left by draining (it exited 0 above); the first one serves on.
        others = [p.returncode for p in cluster.workers if p is not retiring[0].proc]
        assert others == [None]
        failures = [r for r in results if r != "ok"]
        assert not failures, failures[:5]
        assert len(results) > num_at_peak > 0
        for direction in ("up", "down"):
            actions = await _metric(
                session,
                planner_url,
                "baton_planner_scale_actions_total",
                role="decode",
                direction=direction,
            )
            assert actions == 1.0, direction
        desired = await _metric(
            session, planner_url, "baton_planner_desired_workers", role="decode"
        )
        assert desired == 1.0
        print(  # noqa: T201 - the timings, for the record
            f"planner e2e: 2 workers {up_s:.1f} s after the load began, back to 1 worker "
            f"{down_s:.1f} s after it ended, "
            f"{len(results)} requests, none failed"
        )
