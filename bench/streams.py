"""Load benchmark: N concurrent streaming chat completions against a Baton cluster.

It reports completions and errors by kind, TTFT and per-request TPOT (time per output token
after the first) at p50/p99, output tokens/s, server CPU microseconds per output token (utime +
stime of every server process, before vs. after) and frontend memory per open stream (frontend
RSS before the load vs. its peak while the streams are open, divided by the peak number of
streams observed open at once).

Streams are split over ``--client-procs`` processes (spawned), each one asyncio loop (uvloop
where installed) with one lean HTTP/1.1 client (``services/bench/http1.py``; plain
``http://`` only). They start over ``--ramp-s`` seconds so the
frontend's accept queue (backlog 4096) is not flooded. Tokens are counted from the final usage
chunk; TTFT and TPOT use the arrival times of content deltas.

Without ``--url`` it starts a cluster (``services.launcher``, as ``baton up``) on a free port
and stops it afterwards; each worker runs ``ceil(streams / workers)`` sequences at once unless
``--worker-max-num-seqs`` says otherwise. Other ``BATON_DECODE_*`` / ``BATON_FRONTEND_*``
variables in the environment reach the services. The default ``--speedup 0.1`` models a GPU
ten times slower than the sim's default, so that the engine, not a CPU-bound frontend, paces
the tokens: at 10,000 streams each then lasts far longer than the ramp and all are open at
once (at ``--speedup 1`` on 2 cores the first streams finish before the last get a token).

Run it as a script from the repository root (it imports its sibling ``stream_client.py``)::

    .venv/bin/python bench/streams.py --streams 1000
    .venv/bin/python bench/streams.py --streams 10000 --client-procs 4 --json /tmp/b.json
    .venv/bin/python bench/streams.py --url http://127.0.0.1:8000 --server-pids 101,102,103

With ``--url``, ``--server-pids`` lists the server processes (their children count too), the
frontend first unless ``--frontend-pid`` names it; without pids, CPU and memory are not measured.
"""

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import msgspec
import psutil
from stream_client import LoadSpec, Row, client_main, request_body

from services.launcher.config import UpConfig
from services.launcher.threaded import cluster_in_thread

# ---- servers: cluster, CPU, memory --------------------------------------------------------


@dataclass(slots=True)
class Servers:
    url: str
    pids: list[int]
    frontend_pid: int | None


def max_num_seqs(args: argparse.Namespace) -> int:
    """Each worker's batch limit: by default room for every stream at once."""
    return int(args.worker_max_num_seqs or math.ceil(args.streams / args.workers))


@contextlib.contextmanager
def local_cluster(args: argparse.Namespace) -> Iterator[Servers]:
    """Start a cluster as ``baton up`` does, on a free port; stop it on the way out."""
    args.log_dir = args.log_dir or tempfile.mkdtemp(prefix="baton-bench-")
    up = UpConfig(
        port=0,
        num_workers=args.workers,
        num_frontends=args.frontends,
        speedup=args.speedup,
        log_dir=args.log_dir,
        namespace=f"bench{uuid.uuid4().hex[:6]}",
        ready_timeout_s=120.0,
    )
    spec = up.cluster_spec()
    env = {**spec.env, "BATON_DECODE_MAX_NUM_SEQS": str(max_num_seqs(args))}
    with cluster_in_thread(replace(spec, env=env)) as cluster:
        yield Servers(cluster.url, cluster.pids, cluster.frontend.pid)


def tcp_counters() -> dict[str, int]:
    """The kernel's TCP counters for the whole machine (``/proc/net/netstat``'s TcpExt and
    ``/proc/net/snmp``'s Tcp lines, as ``nstat`` names them: ``TcpExtListenOverflows``)."""
    counters: dict[str, int] = {}
    for path, prefixes in (("/proc/net/netstat", ("TcpExt:",)), ("/proc/net/snmp", ("Tcp:",))):
        with open(path) as f:
            lines = [line.split() for line in f if line.startswith(prefixes)]
        for names, values in zip(lines[::2], lines[1::2], strict=True):
            prefix = names[0].rstrip(":")
            for name, value in zip(names[1:], values[1:], strict=True):
                counters[prefix + name] = int(value)
    return counters


# The counters that say a connection or segment was dropped, refused or retried: where a
# connect timeout or a reset comes from (beside ListenOverflows, reported on its own).
TROUBLE_COUNTERS = (
    "TcpExtListenDrops",
    "TcpExtTCPReqQFullDrop",
    "TcpExtTCPReqQFullDoCookies",
    "TcpExtSyncookiesSent",
    "TcpExtTCPBacklogDrop",
    "TcpExtTCPSynRetrans",
    "TcpExtTCPTimeouts",
    "TcpExtTCPAbortOnMemory",
    "TcpExtTCPAbortOnTimeout",
    "TcpExtTCPMemoryPressures",
    "TcpAttemptFails",
    "TcpRetransSegs",
)


def counters_moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Each counter that changed between two readings, by how much (Tcp's ``CurrEstab`` is a
    level, not a count, and is left out)."""
    return {
        name: after[name] - before.get(name, 0)
        for name in after
        if name != "TcpCurrEstab" and after[name] != before.get(name, 0)
    }


# What a server process is, by its command line (Baton's, and Dynamo's for
# bench/dynamo_compare.py).
_LABELS = (
    ("services.frontend", "frontend"),
    ("services.router", "router"),
    ("services.worker", "worker"),
    ("dynamo.frontend", "frontend"),
    ("dynamo.mocker", "worker"),
    ("nats-server", "nats-server"),
    ("etcd", "etcd"),
)


def _label(proc: psutil.Process) -> str:
    cmdline = " ".join(proc.cmdline())
    return next((label for key, label in _LABELS if key in cmdline), str(proc.name()))


def cpu_by_process(pids: list[int]) -> dict[int, tuple[str, float]]:
    """(label, utime + stime seconds) for each pid and all its children, every child labelled
    as its root (a frontend's serving processes are the frontend's)."""
    out: dict[int, tuple[str, float]] = {}
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            label = _label(root)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    times = proc.cpu_times()
                    out[proc.pid] = (label, times.user + times.system)
    return out


def tree_rss(proc: psutil.Process) -> int:
    """RSS of a process and its children (the frontend's serving processes)."""
    total = 0
    for each in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += each.memory_info().rss
    return total


class RssSampler(threading.Thread):
    """Samples the frontend's RSS (all its processes) and the clients' open-stream counters
    every ``interval_s``."""

    def __init__(self, frontend_pid: int | None, counters: Any, interval_s: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(frontend_pid) if frontend_pid else None
        self.counters = counters
        self.interval_s = interval_s
        self.stopping = threading.Event()
        self.peak_rss = self.peak_open = self.peak_streaming = self.num_samples = 0

    def run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            values = list(self.counters)
            self.peak_open = max(self.peak_open, sum(values[0::2]))
            self.peak_streaming = max(self.peak_streaming, sum(values[1::2]))
            if self.proc is not None:
                with contextlib.suppress(psutil.NoSuchProcess):
                    self.peak_rss = max(self.peak_rss, tree_rss(self.proc))
            self.num_samples += 1


# ---- orchestration and report -------------------------------------------------------------


def _warm_up(spec: LoadSpec) -> None:
    """One short request, so the frontend's lazily loaded tokenizer is in the RSS baseline."""
    body = dict(msgspec.json.decode(request_body(spec, 0)), stream=False, max_tokens=2)
    body.pop("stream_options", None)  # only for streams (some servers refuse it otherwise)
    request = urllib.request.Request(
        f"{spec.url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"warm-up request failed: HTTP {exc.code} {exc.read()[:300]!r}") from exc


def _pct(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


def _next_event(events: Any, procs: list[Any], timeout_s: float) -> tuple[Any, ...]:
    """The next client message; raises if a client died or none came in ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with contextlib.suppress(queue.Empty):
            message: tuple[Any, ...] = events.get(timeout=1.0)
            return message
        dead = [p.name for p in procs if p.exitcode not in (None, 0)]
        if dead:
            raise RuntimeError(f"client processes failed: {', '.join(dead)}")
    raise TimeoutError(f"no message from the clients in {timeout_s} s")


def run_load(spec: LoadSpec, servers: Servers) -> dict[str, Any]:
    """Spawn the clients, measure the servers around the run, summarize the rows."""
    ctx = mp.get_context("spawn")
    counters = ctx.RawArray("q", 2 * spec.num_procs)
    go, start_at, events = ctx.Event(), ctx.Value("d", 0.0), ctx.Queue()
    procs = [
        ctx.Process(
            target=client_main,
            args=(i, spec, counters, go, start_at, events),
            name=f"bench-client-{i}",
        )
        for i in range(spec.num_procs)
    ]
    for proc in procs:
        proc.start()
    rows: list[Row] = []
    client_cpu_s = 0.0
    sampler = RssSampler(servers.frontend_pid, counters)
    try:
        for _ in procs:
            _next_event(events, procs, 120)
        _warm_up(spec)
        time.sleep(0.5)
        rss_before = tree_rss(psutil.Process(servers.frontend_pid)) if servers.frontend_pid else 0
        cpu_before = cpu_by_process(servers.pids)
        tcp_before = tcp_counters()
        sampler.start()
        start_at.value = time.monotonic() + 0.2
        go.set()
        for _ in procs:
            _, _, proc_rows, proc_cpu_s = _next_event(events, procs, spec.deadline_s + 120)
            rows.extend(proc_rows)
            client_cpu_s += proc_cpu_s
        cpu_after = cpu_by_process(servers.pids)
        tcp_moved = counters_moved(tcp_before, tcp_counters())
    finally:
        sampler.stopping.set()
        if sampler.is_alive():
            sampler.join(timeout=1.0)
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    cpu_s: defaultdict[str, float] = defaultdict(float)
    for pid, (label, after_s) in cpu_after.items():
        cpu_s[label] += after_s - cpu_before.get(pid, (label, 0.0))[1]
    ok = [r for r in rows if not r[5]]
    num_tokens = sum(r[4] for r in rows)
    wall_s = max((r[2] for r in rows), default=0.0) - min((r[0] for r in rows), default=0.0)
    ttft_ms = [r[1] * 1e3 for r in ok if not math.isnan(r[1])]
    tpot_ms = [r[3] * 1e3 for r in ok if not math.isnan(r[3])]
    server_cpu_s = sum(cpu_s.values())
    measured_memory = servers.frontend_pid is not None and sampler.peak_open > 0
    return {
        "num_streams": spec.num_streams,
        "num_completed": len(ok),
        "num_errors": len(rows) - len(ok),
        "errors": dict(Counter(r[5] for r in rows if r[5]).most_common()),
        "error_started_s": _error_starts(rows),
        "num_short_streams": sum(1 for r in ok if r[4] != spec.max_tokens),
        "num_listen_overflows": tcp_moved.get("TcpExtListenOverflows", 0),
        "tcp_counters_moved": tcp_moved,
        "peak_open_streams": sampler.peak_open,
        "peak_streaming_streams": sampler.peak_streaming,
        "ttft_ms": {"p50": _pct(ttft_ms, 50), "p99": _pct(ttft_ms, 99)},
        "tpot_ms": {"p50": _pct(tpot_ms, 50), "p99": _pct(tpot_ms, 99)},
        "num_output_tokens": num_tokens,
        "wall_s": wall_s,
        "output_tokens_per_s": num_tokens / wall_s if wall_s > 0 else math.nan,
        "server_cpu_s": server_cpu_s if servers.pids else math.nan,
        "server_cpu_s_by_process": dict(cpu_s),
        "server_cpu_us_per_token": server_cpu_s * 1e6 / num_tokens
        if servers.pids and num_tokens
        else math.nan,
        "client_cpu_s": client_cpu_s,
        "frontend_rss_before_mib": rss_before / 2**20,
        "frontend_rss_peak_mib": sampler.peak_rss / 2**20,
        "frontend_kb_per_stream": (sampler.peak_rss - rss_before) / 1024 / sampler.peak_open
        if measured_memory
        else math.nan,
        "num_rss_samples": sampler.num_samples,
    }


def _error_starts(rows: list[Row]) -> dict[str, list[float]]:
    """For each kind of error, when the first and the last stream that met it started
    (seconds after the first stream started): in the ramp, or after it."""
    if not rows:
        return {}
    first = min(r[0] for r in rows)
    starts: defaultdict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r[5]:
            starts[r[5]].append(r[0] - first)
    return {kind: [min(s), max(s)] for kind, s in starts.items()}


def format_report(spec: LoadSpec, result: dict[str, Any]) -> str:
    r = result
    errors = (
        ", ".join(
            f"{kind}: {n}, started {r['error_started_s'][kind][0]:.0f}-"
            f"{r['error_started_s'][kind][1]:.0f} s in"
            for kind, n in r["errors"].items()
        )
        or "none"
    )
    by_process = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["server_cpu_s_by_process"].items()))
    moved = r["tcp_counters_moved"]
    trouble = ", ".join(f"{k} {moved[k]}" for k in TROUBLE_COUNTERS if moved.get(k)) or "none"
    lines = [
        f"Baton streams: {spec.num_streams} streams over {spec.num_procs} client procs, "
        f"max_tokens {spec.max_tokens}, ~{spec.prompt_words + 12} prompt tokens, "
        f"ramp {spec.ramp_s:.1f} s",
        (
            "completed",
            f"{r['num_completed']} / {r['num_streams']}"
            f" ({r['num_short_streams']} of them not max_tokens long)",
        ),
        ("errors", f"{r['num_errors']} ({errors})"),
        ("listen overflows", f"{r['num_listen_overflows']} (kernel, whole machine)"),
        ("TCP trouble", trouble),
        (
            "peak open streams",
            f"{r['peak_open_streams']} in flight, {r['peak_streaming_streams']} streaming",
        ),
        ("TTFT p50 / p99", f"{r['ttft_ms']['p50']:.1f} / {r['ttft_ms']['p99']:.1f} ms"),
        ("TPOT p50 / p99", f"{r['tpot_ms']['p50']:.2f} / {r['tpot_ms']['p99']:.2f} ms"),
        ("output tokens", f"{r['num_output_tokens']} in {r['wall_s']:.1f} s"),
        ("output tokens/s", f"{r['output_tokens_per_s']:.0f}"),
        ("server CPU", f"{r['server_cpu_s']:.1f} s ({by_process})"),
        ("server CPU / token", f"{r['server_cpu_us_per_token']:.1f} us"),
        ("client CPU", f"{r['client_cpu_s']:.1f} s"),
        (
            "frontend RSS",
            f"{r['frontend_rss_before_mib']:.1f} MiB before,"
            f" {r['frontend_rss_peak_mib']:.1f} MiB peak",
        ),
        (
            "frontend mem / stream",
            f"{r['frontend_kb_per_stream']:.1f} KB (over {r['peak_open_streams']} open at once)",
        ),
    ]
    return "\n".join(
        line if isinstance(line, str) else f"  {line[0]:<24}{line[1]}" for line in lines
    )


def _nan_to_none(value: Any) -> Any:
    """JSON has no NaN: unmeasured numbers are written as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--streams", type=int, default=1000, help="concurrent streams")
    p.add_argument(
        "--client-procs", type=int, default=0, help="client processes (0: one per 5000 streams)"
    )
    p.add_argument("--url", default="", help="use this running cluster (http://host:port)")
    p.add_argument("--server-pids", default="", help="PID,PID,... of the servers, frontend first")
    p.add_argument("--frontend-pid", type=int, default=0, help="the frontend's pid")
    p.add_argument("--start-cluster", action="store_true", help="start one (default, no --url)")
    p.add_argument("--workers", type=int, default=2, help="decode workers to start")
    p.add_argument(
        "--frontends", type=int, default=0, help="frontend processes (0: as baton up chooses)"
    )
    p.add_argument(
        "--spread-sources",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on loopback, each client process connects from its own 127.0.0.x",
    )
    p.add_argument("--speedup", type=float, default=0.1, help="sim engine time divisor")
    p.add_argument(
        "--worker-max-num-seqs",
        type=int,
        default=0,
        help="decode max_num_seqs (0: ceil(streams / workers))",
    )
    p.add_argument("--log-dir", default="", help="cluster logs (default: a new temp dir)")
    p.add_argument("--model", default="baton-sim")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32, help="approximate prompt length")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--ramp-s",
        type=float,
        default=-1.0,
        help="seconds over which streams start (-1: streams / 2000)",
    )
    p.add_argument("--stream-timeout-s", type=float, default=300.0)
    p.add_argument("--deadline-s", type=float, default=600.0, help="the whole run's deadline")
    p.add_argument("--json", default="", help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.streams < 1 or args.max_tokens < 1 or args.workers < 1:
        p.error("--streams, --max-tokens and --workers must be >= 1")
    args.client_procs = args.client_procs or math.ceil(args.streams / 5000)
    args.ramp_s = args.ramp_s if args.ramp_s >= 0 else args.streams / 2000
    args.start_cluster = args.start_cluster or not args.url
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.start_cluster:
            servers = stack.enter_context(local_cluster(args))
            print(
                f"cluster up at {servers.url}: {args.workers} workers, speedup {args.speedup},"
                f" max_num_seqs {max_num_seqs(args)} each (logs in {args.log_dir})",
                flush=True,
            )
        else:
            pids = [int(p) for p in args.server_pids.split(",") if p.strip()]
            frontend = args.frontend_pid or (pids[0] if pids else None)
            servers = Servers(args.url.rstrip("/"), pids, frontend)
        spec = LoadSpec(
            url=servers.url,
            model=args.model,
            num_streams=args.streams,
            num_procs=min(args.client_procs, args.streams),
            max_tokens=args.max_tokens,
            prompt_words=max(1, args.prompt_tokens - 12),
            ignore_eos=args.ignore_eos,
            ramp_s=args.ramp_s,
            stream_timeout_s=args.stream_timeout_s,
            deadline_s=args.deadline_s,
            spread_sources=args.spread_sources and "//127." in servers.url,
        )
        result = run_load(spec, servers)
    print(format_report(spec, result))
    if args.json:
        report = {
            "config": {**vars(args), "load": asdict(spec)},
            "machine": {
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "results": result,
        }
        Path(args.json).write_text(json.dumps(_nan_to_none(report), indent=2) + "\n")


if __name__ == "__main__":
    main()
