"""Failover benchmark: streams that outlive a worker killed (SIGKILL) or drained (SIGTERM).

A supervised cluster as ``baton up`` starts it (``--workers`` decode workers) serves
``--streams`` concurrent streaming completions twice with the same prompts: once undisturbed,
once with a fault ``--kill-after-s`` into the run. It reports how many streams completed,
whether every text equals the undisturbed run's (greedy and seeded sampling), how many streams
moved, and the longest pause a client saw between two chunks (p50/p99/max over the streams).

- ``--fault kill``: SIGKILL one decode worker; also when the frontend noticed (its
  ``baton_frontend_silent_workers_total``) and when the supervisor's replacement was ready
  (the time the cluster ran one short).
- ``--fault drain``: SIGTERM one decode worker, which hands its streams to the other
  (``--drain-handoff kv``: with their KV, a live migration; ``recompute``: the other recomputes
  the KV); also how long the drain took (SIGTERM to exit) and the KV bytes moved.
- ``--fault kill-prefill``: a cluster with one prefill worker that every prompt goes to;
  SIGKILL it; the decode workers prefill locally instead (their fallbacks are counted).
- ``--fault nats``: SIGKILL nats-server; the supervisor starts it again on its port after
  ``--outage-s`` (5 s).
- ``--fault etcd``: SIGSTOP etcd for ``--outage-s`` (give 60), then SIGCONT.
- ``--fault router``: SIGKILL the router; frontends place by load until the supervisor's
  replacement is ready.

    .venv/bin/python bench/failover.py --streams 1000 --json /tmp/failover.json
    .venv/bin/python bench/failover.py --fault drain --drain-handoff kv --json /tmp/drain-kv.json
"""

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import signal
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from proto import subjects
from proto.messages import WorkerInfo
from services.launcher.config import UpConfig
from services.launcher.threaded import cluster_in_thread
from shared.codec import worker_info_decoder
from shared.discovery import Discovery


def body(i: int, args: argparse.Namespace, sampling: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": "baton-sim",
        "prompt": [10 + (i * 131 + j * 7) % 5000 for j in range(args.prompt_tokens)],
        "max_tokens": args.output_tokens,
        "ignore_eos": True,
        "stream": True,
        **sampling,
    }


async def one(
    session: aiohttp.ClientSession, url: str, payload: dict[str, Any], gaps: list[float]
) -> str | None:
    """The streamed text, or None if the stream failed in any way; appends to ``gaps`` the
    longest pause between two of its chunks after the first."""
    parts: list[str] = []
    longest = 0.0
    last: float | None = None
    try:
        async with session.post(f"{url}/v1/completions", json=payload) as resp:
            if resp.status != 200:
                return None
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    now = time.monotonic()
                    if last is not None:
                        longest = max(longest, now - last)
                    last = now
                    event = json.loads(line[6:])
                    if "error" in event:
                        return None
                    if event.get("choices"):
                        parts.append(event["choices"][0].get("text") or "")
    except aiohttp.ClientError:
        return None
    gaps.append(longest)
    return "".join(parts)


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name))


def role_pids(root_pid: int, role: str = "decode") -> set[int]:
    return named_pids(root_pid, f"--role {role}")


def named_pids(root_pid: int, needle: str) -> set[int]:
    """Descendants whose command line contains ``needle`` (a server, the router)."""
    root = psutil.Process(root_pid)
    out = set()
    for p in root.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if needle in " ".join(p.cmdline()):
                out.add(p.pid)
    return out


SERVER_FAULTS = {"nats": "nats-server", "etcd": "etcd --name", "router": "services.router"}


def worker_url(pid: int) -> str | None:
    """The HTTP address of the worker at ``pid`` (the one of its listening sockets that
    answers /health)."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.ip == "127.0.0.1":
                url = f"http://127.0.0.1:{conn.laddr.port}"
                with (
                    contextlib.suppress(OSError),
                    urllib.request.urlopen(f"{url}/health", timeout=1) as resp,
                ):
                    if resp.status == 200:
                        return url
    return None


def worker_ready(pid: int) -> bool:
    """The worker at ``pid`` answers /ready."""
    url = worker_url(pid)
    if url is None:
        return False
    with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/ready", timeout=1) as resp:
        return bool(resp.status == 200)
    return False


def decode_metric(root_pid: int, name: str) -> float:
    """``name`` summed over the live decode workers."""
    urls = [u for pid in role_pids(root_pid) if (u := worker_url(pid)) is not None]
    return sum(metric(u, name) for u in urls)


async def run(
    args: argparse.Namespace, url: str, sampling: dict[str, Any], gaps: list[float]
) -> list[str | None]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        return await asyncio.gather(
            *[one(session, url, body(i, args, sampling), gaps) for i in range(args.streams)]
        )


def until(predicate: Callable[[], bool], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not true within {timeout_s} s")
        time.sleep(0.02)


def registered_workers(etcd_url: str, namespace: str, role: str) -> list[WorkerInfo]:
    """The workers of ``role`` registered in etcd now."""

    async def get() -> list[WorkerInfo]:
        async with Discovery.connect(etcd_url) as discovery:
            values = await discovery.get_prefix(subjects.etcd_workers(namespace))
        return [worker_info_decoder.decode(v) for v in values.values()]

    return [info for info in asyncio.run(get()) if info.role.name.lower() == role]


def logged_drain_s(log_dir: str, pid: int) -> float:
    """The drain time the worker at ``pid`` logged (SIGTERM to lease revoked, everything
    moved and closed), from its log; NaN if not found."""
    for path in Path(log_dir).glob("decode-*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if "worker stopped" in line and f"-{pid}-" in line and "drain_s=" in line:
                return float(line.rpartition("drain_s=")[2].split()[0])
    return math.nan


class Streams(threading.Thread):
    """The streams, run in a thread of their own (their own event loop), so that nothing the
    fault's orchestration does (blocking HTTP and process calls) delays them."""

    def __init__(
        self, args: argparse.Namespace, url: str, sampling: dict[str, Any], gaps: list[float]
    ) -> None:
        super().__init__(name="streams", daemon=True)
        self._run = lambda: asyncio.run(run(args, url, sampling, gaps))
        self._texts: list[str | None] | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._texts = self._run()
        except BaseException as exc:  # handed to result(), which raises it again
            self._error = exc

    def result(self, timeout_s: float = 600.0) -> list[str | None]:
        """The streams' texts once they are done; their error if they failed."""
        self.join(timeout_s)
        if self.is_alive():
            raise TimeoutError(f"the streams were not done within {timeout_s} s")
        if self._error is not None:
            raise RuntimeError("the streams failed") from self._error
        assert self._texts is not None
        return self._texts


def faulted_run(
    args: argparse.Namespace,
    url: str,
    sampling: dict[str, Any],
    gaps: list[float],
    log_dir: str,
    etcd_url: str,
    namespace: str,
) -> tuple[list[str | None], dict[str, float]]:
    """Start the streams, fault a server or a worker ``--kill-after-s`` in, wait for the
    streams; their texts and what was measured about the fault."""
    streams = Streams(args, url, sampling, gaps)
    streams.start()
    time.sleep(args.kill_after_s)
    facts = {"in_flight_at_fault": metric(url, "baton_frontend_in_flight_requests")}
    if args.fault in SERVER_FAULTS:
        faulted = fault_server(args.fault, args.outage_s, facts)
        texts = streams.result()
        facts["streams_done_after_fault_s"] = time.monotonic() - faulted
        return texts, facts
    root = os.getpid()
    role = "prefill" if args.fault == "kill-prefill" else "decode"
    fallbacks_before = decode_metric(root, "baton_worker_prefill_fallbacks")
    moved_bytes_before = decode_metric(root, "baton_worker_moved_in_bytes")
    faulted = fault_worker(args.fault, role, url, log_dir, etcd_url, namespace, facts)
    texts = streams.result()
    facts["streams_done_after_fault_s"] = time.monotonic() - faulted
    facts["prefill_fallbacks"] = (
        decode_metric(root, "baton_worker_prefill_fallbacks") - fallbacks_before
    )
    facts["moved_kv_bytes"] = (
        decode_metric(root, "baton_worker_moved_in_bytes") - moved_bytes_before
    )
    facts["remote_prefills"] = decode_metric(root, "baton_worker_remote_prefills")
    return texts, facts


def fault_server(fault: str, outage_s: float, facts: dict[str, float]) -> float:
    """Kill (or, for etcd, stop for ``outage_s``) the server process; when it happened."""
    root = os.getpid()
    facts.update(victim_in_flight=math.nan, prefill_fallbacks=0.0, moved_kv_bytes=0.0)
    needle = SERVER_FAULTS[fault]
    [victim] = named_pids(root, needle)
    faulted = time.monotonic()
    if fault == "etcd":
        os.kill(victim, signal.SIGSTOP)
        time.sleep(outage_s)
        os.kill(victim, signal.SIGCONT)
    else:
        os.kill(victim, signal.SIGKILL)

        def server_back() -> bool:
            fresh = named_pids(root, needle) - {victim}
            if fault == "router":
                return bool(fresh) and all(worker_ready(p) for p in fresh)
            return bool(fresh)

        until(server_back)
    facts["one_short_s"] = time.monotonic() - faulted
    return faulted


def fault_worker(
    fault: str,
    role: str,
    url: str,
    log_dir: str,
    etcd_url: str,
    namespace: str,
    facts: dict[str, float],
) -> float:
    """Drain or kill the busiest worker of ``role`` (as etcd lists them: the fault should hit
    as many streams as it can) and wait until the launcher has replaced it; when it happened."""
    root = os.getpid()
    victims = role_pids(root, role)
    in_flight = {
        info.pid: metric(info.http_url, "baton_worker_in_flight")
        for info in registered_workers(etcd_url, namespace, role)
    }
    victim = max(in_flight, key=in_flight.__getitem__)
    facts["victim_in_flight"] = in_flight[victim]
    silent_before = metric(url, "baton_frontend_silent_workers_total")
    process = psutil.Process(victim)
    os.kill(victim, signal.SIGTERM if fault == "drain" else signal.SIGKILL)
    faulted = time.monotonic()
    if fault == "drain":
        until(lambda: not process.is_running() or process.status() == "zombie")
        facts["drain_s"] = time.monotonic() - faulted
        facts["worker_drain_s"] = logged_drain_s(log_dir, victim)
    elif fault == "kill":
        until(lambda: metric(url, "baton_frontend_silent_workers_total") > silent_before)
        facts["detect_s"] = time.monotonic() - faulted

    def replaced() -> bool:
        fresh = role_pids(root, role) - victims
        return bool(fresh) and all(worker_ready(p) for p in fresh)

    until(replaced)
    facts["one_short_s"] = time.monotonic() - faulted
    return faulted


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--output-tokens", type=int, default=200)
    p.add_argument("--kill-after-s", type=float, default=6.0, help="when the fault happens")
    p.add_argument(
        "--fault",
        choices=("kill", "drain", "kill-prefill", *SERVER_FAULTS),
        default="kill",
    )
    p.add_argument("--outage-s", type=float, default=5.0, help="nats and etcd faults: how long")
    p.add_argument("--drain-handoff", choices=("kv", "recompute"), default="kv")
    p.add_argument("--speedup", type=float, default=0.5, help="sim time divisor (< 1: slower)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    os.environ["BATON_DECODE_DRAIN_HANDOFF"] = args.drain_handoff
    if args.fault == "kill-prefill":  # every prompt to the prefill worker
        os.environ["BATON_ROUTER_MIN_REMOTE_PREFILL_TOKENS"] = "1"
        os.environ["BATON_ROUTER_MIN_REMOTE_PREFILL_FRACTION"] = "0"
        # A burst must not fall back to placement by load for want of the router's answer.
        os.environ["BATON_FRONTEND_ROUTE_TIMEOUT_S"] = "10"
    up = UpConfig(
        port=0,
        num_workers=args.workers,
        num_prefill_workers=1 if args.fault == "kill-prefill" else 0,
        speedup=args.speedup,
        namespace=f"failover{uuid.uuid4().hex[:6]}",
        log_dir=tempfile.mkdtemp(prefix="baton-failover-"),
        ready_timeout_s=120.0,
    )
    spec = up.cluster_spec()
    if args.fault == "nats":  # the supervisor starts it again after the outage
        spec = dataclasses.replace(spec, restart_backoff_s=args.outage_s)
    results: dict[str, Any] = {"args": vars(args), "runs": {}}
    with cluster_in_thread(spec) as cluster:
        for name, sampling in (
            ("greedy", {"temperature": 0}),
            ("seeded", {"temperature": 0.8, "seed": 11}),
        ):
            started = time.monotonic()
            quiet_gaps: list[float] = []
            expected = asyncio.run(run(args, cluster.url, sampling, quiet_gaps))
            undisturbed_s = time.monotonic() - started
            moved_before = metric(cluster.url, "baton_frontend_migrations_total")
            gaps: list[float] = []
            got, facts = faulted_run(
                args, cluster.url, sampling, gaps, up.log_dir, cluster.etcd_url, up.namespace
            )
            moved = metric(cluster.url, "baton_frontend_migrations_total") - moved_before
            row = {
                "undisturbed_completed": sum(t is not None for t in expected),
                "undisturbed_s": undisturbed_s,
                "completed": sum(t is not None for t in got),
                "identical": sum(1 for a, b in zip(expected, got, strict=True) if a == b and a),
                "streams_moved": moved,
                "longest_pause_p50_s": quantile(gaps, 0.5),
                "longest_pause_p99_s": quantile(gaps, 0.99),
                "longest_pause_max_s": max(gaps, default=float("nan")),
                "undisturbed_longest_pause_p50_s": quantile(quiet_gaps, 0.5),
                "undisturbed_longest_pause_p99_s": quantile(quiet_gaps, 0.99),
                **facts,
            }
            results["runs"][name] = row
            how = {
                "kill": f"detected in {row.get('detect_s', float('nan')):.2f} s",
                "drain": (
                    f"drained in {row.get('worker_drain_s', float('nan')):.2f} s by the worker's"
                    f" log, exited {row.get('drain_s', float('nan')):.2f} s after SIGTERM, "
                    f"{row['moved_kv_bytes'] / 1e6:.1f} MB of KV moved"
                ),
                "kill-prefill": (
                    f"{row['prefill_fallbacks']:.0f} prefills fell back"
                    f" ({row.get('remote_prefills', 0):.0f} remote prefills in the cluster so far)"
                ),
                "nats": f"nats-server back after {row['one_short_s']:.1f} s",
                "etcd": f"etcd stopped {row['one_short_s']:.1f} s",
                "router": f"router replaced after {row['one_short_s']:.1f} s",
            }[args.fault]
            print(
                f"{name} ({args.fault}"
                f"{', ' + args.drain_handoff if args.fault == 'drain' else ''}): "
                f"{row['completed']}/{args.streams} completed, "
                f"{row['identical']} identical to the undisturbed run; "
                f"{row['in_flight_at_fault']:.0f} in flight at the fault "
                f"({row['victim_in_flight']:.0f} on the {args.fault} victim), {moved:.0f} moved; "
                f"{how}; longest pause per stream p50/p99/max "
                f"{row['longest_pause_p50_s']:.2f}/{row['longest_pause_p99_s']:.2f}/"
                f"{row['longest_pause_max_s']:.2f} s (undisturbed p50/p99 "
                f"{row['undisturbed_longest_pause_p50_s']:.2f}/"
                f"{row['undisturbed_longest_pause_p99_s']:.2f} s); replacement ready after "
                f"{row['one_short_s']:.1f} s; all streams done "
                f"{row['streams_done_after_fault_s']:.1f} s after the fault "
                f"(an undisturbed run took {undisturbed_s:.1f} s)"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
