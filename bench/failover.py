"""Failover benchmark: streams that outlive a decode worker killed with SIGKILL.

A supervised cluster as ``baton up`` starts it (``--workers`` decode workers) serves
``--streams`` concurrent streaming completions twice with the same prompts: once undisturbed,
once with one decode worker killed ``--kill-after-s`` into the run. It reports how many streams
completed, whether every text equals the undisturbed run's (greedy and seeded sampling), when
the frontend noticed (its ``baton_frontend_silent_workers_total``), how many streams moved, and
when the supervisor's replacement worker was ready again (the time the cluster ran one short).

    .venv/bin/python bench/failover.py --streams 1000 --json /tmp/failover.json
"""

import argparse
import asyncio
import contextlib
import json
import os
import signal
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from services.launcher.config import UpConfig
from services.launcher.threaded import cluster_in_thread


def body(i: int, args: argparse.Namespace, sampling: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": "baton-sim",
        "prompt": [10 + (i * 131 + j * 7) % 5000 for j in range(args.prompt_tokens)],
        "max_tokens": args.output_tokens,
        "ignore_eos": True,
        "stream": True,
        **sampling,
    }


async def one(session: aiohttp.ClientSession, url: str, payload: dict[str, Any]) -> str | None:
    """The streamed text, or None if the stream failed in any way."""
    parts: list[str] = []
    try:
        async with session.post(f"{url}/v1/completions", json=payload) as resp:
            if resp.status != 200:
                return None
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    event = json.loads(line[6:])
                    if "error" in event:
                        return None
                    if event.get("choices"):
                        parts.append(event["choices"][0].get("text") or "")
    except aiohttp.ClientError:
        return None
    return "".join(parts)


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name))


def decode_pids(root_pid: int) -> set[int]:
    root = psutil.Process(root_pid)
    return {
        p.pid for p in root.children(recursive=True) if "--role decode" in " ".join(p.cmdline())
    }


def worker_ready(pid: int) -> bool:
    """The worker at ``pid`` answers /ready (found among its listening sockets)."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.ip == "127.0.0.1":
                with contextlib.suppress(OSError):
                    url = f"http://127.0.0.1:{conn.laddr.port}/ready"
                    with urllib.request.urlopen(url, timeout=1) as resp:
                        if resp.status == 200:
                            return True
    return False


async def run(args: argparse.Namespace, url: str, sampling: dict[str, Any]) -> list[str | None]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        return await asyncio.gather(
            *[one(session, url, body(i, args, sampling)) for i in range(args.streams)]
        )


async def until(predicate: Callable[[], bool], timeout_s: float = 120.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.02)


def killed_run(
    args: argparse.Namespace, url: str, sampling: dict[str, Any]
) -> tuple[list[str | None], dict[str, float]]:
    root = os.getpid()
    victims = sorted(decode_pids(root))
    victim = victims[0]
    facts: dict[str, float] = {}

    async def main() -> list[str | None]:
        task = asyncio.create_task(run(args, url, sampling))
        await asyncio.sleep(args.kill_after_s)
        facts["in_flight_at_kill"] = metric(url, "baton_frontend_in_flight_requests")
        silent_before = metric(url, "baton_frontend_silent_workers_total")
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        await until(lambda: metric(url, "baton_frontend_silent_workers_total") > silent_before)
        facts["detect_s"] = time.monotonic() - killed

        def replaced() -> bool:
            fresh = decode_pids(root) - set(victims)
            return bool(fresh) and all(worker_ready(p) for p in fresh)

        await until(replaced)
        facts["one_short_s"] = time.monotonic() - killed
        texts = await task
        facts["streams_done_after_kill_s"] = time.monotonic() - killed
        return texts

    return asyncio.run(main()), facts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--output-tokens", type=int, default=200)
    p.add_argument("--kill-after-s", type=float, default=6.0)
    p.add_argument("--speedup", type=float, default=0.5, help="sim time divisor (< 1: slower)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    up = UpConfig(
        port=0,
        num_workers=args.workers,
        speedup=args.speedup,
        namespace=f"failover{uuid.uuid4().hex[:6]}",
        log_dir=tempfile.mkdtemp(prefix="baton-failover-"),
        ready_timeout_s=120.0,
    )
    results: dict[str, Any] = {"args": vars(args), "runs": {}}
    with cluster_in_thread(up.cluster_spec()) as cluster:
        for name, sampling in (
            ("greedy", {"temperature": 0}),
            ("seeded", {"temperature": 0.8, "seed": 11}),
        ):
            started = time.monotonic()
            expected = asyncio.run(run(args, cluster.url, sampling))
            undisturbed_s = time.monotonic() - started
            moved_before = metric(cluster.url, "baton_frontend_migrations_total")
            got, facts = killed_run(args, cluster.url, sampling)
            moved = metric(cluster.url, "baton_frontend_migrations_total") - moved_before
            row = {
                "undisturbed_completed": sum(t is not None for t in expected),
                "undisturbed_s": undisturbed_s,
                "completed": sum(t is not None for t in got),
                "identical": sum(1 for a, b in zip(expected, got, strict=True) if a == b and a),
                "streams_moved": moved,
                **facts,
            }
            results["runs"][name] = row
            print(
                f"{name}: {row['completed']}/{args.streams} completed after the kill, "
                f"{row['identical']} identical to the undisturbed run; "
                f"{row['in_flight_at_kill']:.0f} in flight at the kill, {moved:.0f} moved; "
                f"detected in {row['detect_s']:.2f} s; replacement ready after "
                f"{row['one_short_s']:.1f} s (the cluster ran one worker short that long); "
                f"all streams done {row['streams_done_after_kill_s']:.1f} s after the kill "
                f"(an undisturbed run took {undisturbed_s:.1f} s)"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
