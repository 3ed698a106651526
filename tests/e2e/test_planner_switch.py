"""The planner moves capacity between the pools by switching a worker's role, with the total
fixed (`--max-total-workers`): a prefill-heavy load takes a decode worker into the prefill
pool, a decode-heavy one takes it back, no process starts or stops, no request fails."""

import asyncio
import random
import re
from pathlib import Path

import aiohttp
import pytest

from proto.messages import WorkerRole
from services.launcher.cluster import ClusterSpec, LocalCluster, local_cluster
from shared.discovery import Discovery
from shared.discovery.watch import WorkerDirectory
from shared.servers import ServerProcess
from tests.e2e.args import ALWAYS_REMOTE

MODEL = "baton-sim"
PLANNER_ARGS = (
    "--interval-s", "0.5",
    "--up-intervals", "2",
    "--down-intervals", "1000",  # no process is retired: only switches move workers
    "--up-cooldown-s", "0",
    "--max-waiting", "1",
    "--min-decode-workers", "1",
    "--max-decode-workers", "2",
    "--min-prefill-workers", "1",
    "--max-prefill-workers", "2",
    "--max-total-workers", "3",
    "--log-level", "info",
)  # fmt: skip


def pools(directory: WorkerDirectory) -> tuple[int, int]:
    """(decode, prefill) workers registered and not draining."""
    roles = [i.role for i in directory.workers.values() if not i.is_draining]
    return roles.count(WorkerRole.DECODE), roles.count(WorkerRole.PREFILL)


async def client(
    session: aiohttp.ClientSession,
    url: str,
    stop: asyncio.Event,
    results: list[str],
    *,
    prompt_tokens: int,
    max_tokens: int,
    seed: int,
) -> None:
    """Send requests one after another until ``stop``, each prompt new (no cached prefix)."""
    rng = random.Random(seed)
    while not stop.is_set():
        body = {
            "model": MODEL,
            "prompt": [rng.randrange(10, 6000) for _ in range(prompt_tokens)],
            "max_tokens": max_tokens,
            "ignore_eos": True,
        }
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            payload = await resp.json()
            ok = resp.status == 200 and payload["usage"]["completion_tokens"] == max_tokens
            results.append("ok" if ok else f"{resp.status} {payload}")


async def load(
    session: aiohttp.ClientSession, cluster: LocalCluster, results: list[str], **shape: int
) -> tuple[asyncio.Event, list[asyncio.Task[None]]]:
    stop = asyncio.Event()
    num_clients = shape.pop("num_clients")
    tasks = [
        asyncio.create_task(client(session, cluster.url, stop, results, seed=i, **shape))
        for i in range(num_clients)
    ]
    return stop, tasks


async def planner_metric(session: aiohttp.ClientSession, url: str, name: str) -> str:
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return "\n".join(line for line in text.splitlines() if line.startswith(name))


def switches(text: str, source: str, target: str) -> float:
    match = re.search(rf'^\S+\{{from="{source}",to="{target}"\}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.mark.timeout(120)
async def test_planner_switches_roles_with_the_load_at_a_fixed_total(
    nats_server: ServerProcess, etcd_server: ServerProcess, namespace: str, tmp_path: Path
) -> None:
    spec = ClusterSpec(
        namespace=namespace,
        nats_url=nats_server.url,
        etcd_url=etcd_server.url,
        num_routers=1,
        router_args=ALWAYS_REMOTE,
        num_prefill_workers=1,
        # A slow prefill worker, one prompt per step: long prompts queue up on it.
        prefill_args=("--speedup", "0.2", "--max-num-batched-tokens", "2048"),
        num_workers=2,
        decode_args=("--max-num-seqs", "4"),
        frontend_args=("--route-timeout-s", "10"),
        planner=True,
        max_workers=2,
        planner_args=PLANNER_ARGS,
        log_dir=str(tmp_path),
        log_level="warning",
        ready_timeout_s=30.0,
        stop_timeout_s=15.0,
    )
    results: list[str] = []
    stops: list[asyncio.Event] = []
    tasks: list[asyncio.Task[None]] = []
    async with (
        local_cluster(spec) as cluster,
        Discovery.connect(etcd_server.url) as discovery,
        discovery.watch_workers(namespace) as directory,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
    ):
        planner_url = cluster.planner_urls[0]
        pids = sorted(p.pid for p in [*cluster.workers, *cluster.prefills])
        assert pools(directory) == (2, 1)
        try:
            # Prefill-heavy: long prompts, two tokens out. The prefill worker's queue grows,
            # the decode workers wait for KV: a decode worker becomes a prefill worker.
            stop, heavy = await load(
                session, cluster, results, num_clients=6, prompt_tokens=1500, max_tokens=2
            )
            stops.append(stop)
            tasks += heavy
            async with asyncio.timeout(30):
                await directory.wait_for(lambda: pools(directory) == (1, 2))
            stop.set()
            await asyncio.gather(*heavy)
            # Decode-heavy: short prompts, long outputs on the one decode worker left (four
            # at a time): a prefill worker becomes a decode worker again.
            stop, heavy = await load(
                session, cluster, results, num_clients=12, prompt_tokens=16, max_tokens=48
            )
            stops.append(stop)
            tasks += heavy
            async with asyncio.timeout(30):
                await directory.wait_for(lambda: pools(directory) == (2, 1))
            await asyncio.sleep(1.0)  # serving on through the new pools
            stop.set()
            await asyncio.gather(*heavy)
        finally:
            for stop in stops:
                stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)

        failures = [r for r in results if r != "ok"]
        assert not failures, failures[:5]
        assert len(results) > 0
        # The same three processes throughout: capacity moved by switching, not restarting.
        assert sorted(p.pid for p in [*cluster.workers, *cluster.prefills]) == pids
        assert all(p.returncode is None for p in [*cluster.workers, *cluster.prefills])
        counts = await planner_metric(session, planner_url, "baton_planner_role_switches_total")
        assert switches(counts, "decode", "prefill") == 1.0, counts
        assert switches(counts, "prefill", "decode") == 1.0, counts
        last = await planner_metric(session, planner_url, "baton_planner_role_switch_seconds")
        switch_s = float(last.split()[-1])
        assert 0 < switch_s < 5.0, last
        print(  # noqa: T201 - for the record
            f"planner switch e2e: {len(results)} requests, none failed; "
            f"last switch {switch_s * 1000:.0f} ms"
        )
