"""Graceful drain, a dying worker, and `baton up` as a user runs it."""

import asyncio
import json
import os
import signal
import subprocess
import sys

import aiohttp
import openai
import psutil

from shared.discovery import Discovery
from shared.servers import free_port

MODEL = "baton-sim"


async def _read_events(resp, events: list[dict], limit: int | None = None) -> None:
    async for line in resp.content:
        if line.startswith(b"data: {"):
            events.append(json.loads(line[6:]))
            if limit is not None and len(events) >= limit:
                return


async def test_sigterm_drains_in_flight_streams_then_exits_zero(start_cluster):
    cluster = await start_cluster(num_workers=1, worker_args=("--drain-timeout-s", "30"))
    worker = cluster.workers[0]
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "drain"}],
        "stream": True,
        "max_tokens": 300,
        "ignore_eos": True,
    }
    events: list[dict] = []
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{cluster.api}/chat/completions", json=body) as resp:
            assert resp.status == 200
            await _read_events(resp, events, limit=3)
            worker.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                await _read_events(resp, events)
        # The stream ran to its end although the worker was asked to stop.
        assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
        async with asyncio.timeout(30):
            assert await worker.wait() == 0
        # With its only worker gone, the model has nobody to serve it: 503, not a hang.
        async with asyncio.timeout(15):
            while True:
                async with session.post(
                    f"{cluster.api}/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
                ) as resp:
                    if resp.status == 503:
                        break
                await asyncio.sleep(0.2)


async def test_a_killed_only_worker_ends_its_streams_with_an_error(start_cluster):
    # Its streams would move to another worker; with none left, they end with an error
    # event that says why (worker gone, nowhere to move), never a hang.
    cluster = await start_cluster(num_workers=1, worker_args=("--lease-ttl-s", "2"))
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "crash"}],
        "stream": True,
        "max_tokens": 5000,
        "ignore_eos": True,
    }
    events: list[dict] = []
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{cluster.api}/chat/completions", json=body) as resp:
            await _read_events(resp, events, limit=2)
            cluster.workers[0].kill()
            async with asyncio.timeout(20):
                await _read_events(resp, events)
    assert "error" in events[-1]
    assert "went away" in events[-1]["error"]["message"]


def test_baton_up_serves_and_stops_on_sigterm(tmp_path):
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "services.launcher",
        "up",
        "--port",
        str(port),
        "--num-workers",
        "1",
        "--log-dir",
        str(tmp_path),
        "--namespace",
        "uptest",
        "--frontend-nice",
        "3",
    ]
    with subprocess.Popen(args, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert f"http://127.0.0.1:{port}/v1" in line
            api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
            reply = api.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=4,
                extra_body={"ignore_eos": True},
            )
            assert reply.usage.completion_tokens == 4
            # --frontend-nice reaches the frontend processes (0 by default); the rest keep
            # the launcher's niceness.
            base = os.getpriority(os.PRIO_PROCESS, 0)
            nice = {
                " ".join(child.cmdline()): child.nice()
                for child in psutil.Process(proc.pid).children(recursive=True)
            }
            frontends = [n for cmd, n in nice.items() if "services.frontend" in cmd]
            others = [n for cmd, n in nice.items() if "services.frontend" not in cmd]
            assert frontends
            assert set(frontends) == {min(19, base + 3)}
            assert set(others) == {base}
        finally:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert (tmp_path / "frontend.log").exists()
    assert (tmp_path / "decode-0.log").exists()


async def test_workers_serve_health_ready_and_metrics(start_cluster):
    cluster = await start_cluster(num_workers=1)
    async with Discovery.connect(cluster.etcd_url) as discovery:
        async with discovery.watch_workers(cluster.namespace) as directory:
            (info,) = directory.workers.values()
    assert info.http_url
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{info.http_url}/health") as resp:
            assert resp.status == 200
        async with session.get(f"{info.http_url}/ready") as resp:
            assert resp.status == 200
            assert (await resp.json())["role"] == "decode"
        async with session.post(
            f"{cluster.api}/completions",
            json={"model": "baton-sim", "prompt": "hello", "max_tokens": 3, "ignore_eos": True},
        ) as resp:
            assert resp.status == 200
            # The sim draws each request's length (EOS) from its id: without ignore_eos one
            # request in a few dozen stops before its third token and steps fewer times.
            assert (await resp.json())["usage"]["completion_tokens"] == 3
        async with session.get(f"{info.http_url}/metrics") as resp:
            text = await resp.text()
    steps = next(ln for ln in text.splitlines() if ln.startswith("baton_worker_steps "))
    assert float(steps.split()[-1]) >= 3
    assert "baton_worker_shed_at_admission 0.0" in text
