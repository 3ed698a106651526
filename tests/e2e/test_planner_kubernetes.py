"""`baton-planner --connector kubernetes` through its CLI, against the session's NATS and etcd
and a real HTTP server playing the Kubernetes API (tests/kubernetes_api.py): it starts, lives
through an API that is down (logging why, retrying at each decision), and scales the decode
Deployment once the API answers."""

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from proto.messages import WorkerRole
from services.planner.__main__ import main
from shared.discovery import Discovery
from shared.servers import ServerProcess, free_port
from tests.kubernetes_api import (
    KubernetesAPI,
    assert_valid_against_kubernetes_schemas,
    start,
    write_kubeconfig,
)

NS = "serving"
TOKEN = "planner-token"


async def stop(proc: asyncio.subprocess.Process) -> int:
    """SIGTERM the planner (unless it exited) and its exit code, within 15 s."""
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(15):
        return await proc.wait()


@pytest.mark.timeout(90)
async def test_planner_cli_scales_the_decode_deployment_and_outlives_an_api_outage(
    nats_server: ServerProcess, etcd_server: ServerProcess, namespace: str, tmp_path: Path
) -> None:
    api = KubernetesAPI(token=TOKEN)
    api.add(NS, "baton-decode", 0)
    api.outage = 503  # down from the start
    runner = await start(api)
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url, TOKEN, NS)
    port = free_port()
    # No worker registers, so the first decision raises the decode pool to its minimum (1)
    # and then holds that target (pending) for the settle timeout: the write is retried at
    # every decision until the API answers.
    args = [
        sys.executable, "-m", "services.planner",
        "--connector", "kubernetes",
        "--k8s-kubeconfig", str(kubeconfig),
        "--nats-url", nats_server.url,
        "--etcd-url", etcd_server.url,
        "--namespace", namespace,
        "--interval-s", "0.2",
        "--port", str(port),
        "--log-level", "info",
    ]  # fmt: skip
    log_path = tmp_path / "planner.log"

    def num_failed_writes() -> int:
        return sum(1 for r in api.requests if r.status == 503)

    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(*args, stdout=log, stderr=subprocess.STDOUT)
    try:
        async with asyncio.timeout(30):
            await api.wait_for(lambda: num_failed_writes() >= 4)  # start-up read + 3 tries
        assert proc.returncode is None
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/ready") as resp:
                assert resp.status == 200
                assert (await resp.json())["desired"] == {"decode": 1}
        api.outage = None
        async with asyncio.timeout(30):
            await api.wait_for(lambda: api.replicas(NS, "baton-decode") == 1)
        assert proc.returncode is None
    finally:
        returncode = await stop(proc)
        await runner.cleanup()
    text = log_path.read_text()
    assert returncode == 0, text[-2000:]
    assert "kubernetes: cannot read role=decode" in text
    assert "scaling failed role=decode deployment=serving/baton-decode replicas=1" in text
    assert "503 ServiceUnavailable: the API is down" in text
    assert "kubernetes: scaled role=decode deployment=serving/baton-decode replicas=1" in text
    (patch,) = api.of("PATCH")
    assert patch.status == 200
    assert_valid_against_kubernetes_schemas(api)


def test_planner_cli_exits_2_when_no_kubernetes_credentials_are_found(tmp_path, capsys):
    absent = tmp_path / "absent"
    with pytest.raises(SystemExit) as exited:
        main(["--connector", "kubernetes", "--k8s-kubeconfig", str(absent)])
    assert exited.value.code == 2
    assert "no Kubernetes API credentials" in capsys.readouterr().err


@pytest.mark.timeout(120)
async def test_with_one_worker_deployment_the_planner_switches_pod_roles_in_place(
    start_cluster, etcd_server: ServerProcess, namespace: str, tmp_path: Path
) -> None:
    """``--k8s-workers-deployment``: the prefill pool's minimum is met by switching a decode
    worker over the bus, not by scaling anything: the Deployment keeps its two pods."""
    cluster = await start_cluster(num_workers=2, num_routers=1)
    api = KubernetesAPI(token=TOKEN)
    api.add(NS, "baton-workers", 2)
    runner = await start(api)
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url, TOKEN, NS)
    args = [
        sys.executable, "-m", "services.planner",
        "--connector", "kubernetes",
        "--k8s-kubeconfig", str(kubeconfig),
        "--k8s-workers-deployment", "baton-workers",
        "--nats-url", cluster.spec.nats_url,
        "--etcd-url", etcd_server.url,
        "--namespace", namespace,
        "--interval-s", "0.2",
        "--min-prefill-workers", "1",
        "--max-prefill-workers", "1",
        "--max-total-workers", "2",
        "--port", str(free_port()),
        "--log-level", "info",
    ]  # fmt: skip
    log_path = tmp_path / "planner.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(*args, stdout=log, stderr=subprocess.STDOUT)
    try:
        async with (
            Discovery.connect(etcd_server.url) as discovery,
            discovery.watch_workers(namespace) as directory,
            asyncio.timeout(60),
        ):
            await directory.wait_for(
                lambda: (
                    sorted(i.role for i in directory.workers.values())
                    == [WorkerRole.PREFILL, WorkerRole.DECODE]
                )
            )
        pids = {i.pid for i in directory.workers.values()}
        # The worker re-registers before it answers the planner, so the planner's own line
        # can follow the new entry by a moment.
        async with asyncio.timeout(15):
            while True:
                if "role switched" in log_path.read_text():
                    break
                await asyncio.sleep(0.05)
    finally:
        returncode = await stop(proc)
        await runner.cleanup()
    text = log_path.read_text()
    assert returncode == 0, text[-2000:]
    assert "role switched" in text
    # The same two processes serve both pools, and the Deployment was never scaled.
    assert pids == {p.pid for p in cluster.workers}
    assert api.of("PATCH") == []
    assert api.replicas(NS, "baton-workers") == 2
    assert_valid_against_kubernetes_schemas(api)
