"""Soak: does any process of a `baton up` cluster grow under steady load?

Starts the real `baton up` (its defaults, on a free port, logs in ``<out>.logs/``), waits until
the frontend is ready, then runs `baton bench` at a steady ``--rate`` (open-loop Poisson) for
``--duration-s``, sampling the resident memory (RSS) and the open file descriptors of every
process of the cluster (the launcher, nats-server, etcd, routers, workers, frontends; found as
its process tree) every ``--interval-s``.

Growth is measured after ``--warmup-s``, robust to noise and still able to see a leak: the
post-warm-up samples are cut in thirds, and growth is the median of the last third over the
median of the middle third. Medians ignore the spikes a garbage collection or a burst of
arrivals makes; the first third is left out because caches (the prefix cache, allocator
arenas, connection pools) may still be filling there; a leak of L bytes per second raises the
last median over the middle one by about L x (a third of the window), whatever the noise. A
least-squares slope over the whole window is reported beside it (as % per hour). The bound:
RSS growth <= ``--max-rss-growth-pct`` (1 %), and the fewest fds open in the last third at
most ``--max-fd-growth`` (2) over the fewest in the middle third. The fds counted leave out
the client's own HTTP connections (established on the cluster's port): the client keeps them
open in its pool, and a stall that makes it open a few more raises the floor without any
leak on the server's side. The other fds follow the requests in flight (their bus and engine
work), so their median moves with every burst, while a leaked fd never closes and raises the
minimum (a leak of one per thousand requests exceeds the bound within a minute at 120
req/s); a connection the server forgets to close stays counted (the client closed it, so it
is no longer established). A process that exits or is restarted fails the run.

Prints a table, writes ``--out`` (JSON: configuration, per-process figures, every sample) and
a PNG beside it (RSS and fd curves per process; needs matplotlib, ``pip install -e
'.[bench]'``). Exits 1 if any process broke the bound.

    .venv/bin/python bench/soak.py --duration-s 1800 --warmup-s 300 --rate 120 --out /tmp/soak.json
"""

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from shared.servers import free_port


@dataclass
class Track:
    """One process's samples: seconds since the load started, RSS bytes, open fds, and of
    those the client's HTTP connections to it (none in runs recorded before they were
    counted)."""

    name: str
    pid: int
    t_s: list[float] = field(default_factory=list)
    rss_bytes: list[int] = field(default_factory=list)
    num_fds: list[int] = field(default_factory=list)
    exited_at_s: float | None = None
    num_client_conns: list[int] = field(default_factory=list)

    def server_fds(self) -> list[int]:
        """The open fds less the client's HTTP connections, sample by sample."""
        if len(self.num_client_conns) != len(self.num_fds):
            return self.num_fds
        return [n - c for n, c in zip(self.num_fds, self.num_client_conns, strict=True)]


@dataclass
class Growth:
    name: str
    pid: int
    num_samples: int
    rss_mid_mib: float
    rss_last_mib: float
    rss_growth_pct: float
    rss_slope_pct_per_h: float
    fds_mid: float  # the fewest open in the middle third
    fds_last: float  # ... in the last third
    fd_growth: float
    is_ok: bool
    why: str = ""


def process_name(proc: psutil.Process, counts: dict[str, int]) -> str:
    """A readable, unique name from the command line (decode-0, frontend-1, nats, ...)."""
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        cmd = []
    text = " ".join(cmd)
    if "nats-server" in text:
        base = "nats"
    elif cmd and os.path.basename(cmd[0]) == "etcd":
        base = "etcd"
    elif "services.worker" in text:
        base = "prefill" if "prefill" in text else "decode"
    elif "services.router" in text:
        base = "router"
    elif "services.frontend" in text:
        base = "frontend"
    elif "resource_tracker" in text:  # multiprocessing's, for the workers' shared memory
        base = "shm-tracker"
    else:
        base = os.path.basename(cmd[0]) if cmd else "process"
    counts[base] = counts.get(base, 0) + 1
    return f"{base}-{counts[base] - 1}"


def wait_ready(url: str, up: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if up.poll() is not None:
            raise RuntimeError(f"baton up exited with code {up.returncode} during start-up")
        with (
            contextlib.suppress(OSError, ValueError),
            urllib.request.urlopen(f"{url}/ready", timeout=2) as resp,
        ):
            if resp.status == 200 and json.loads(resp.read()).get("ready"):
                return
        time.sleep(0.5)
    raise TimeoutError(f"cluster at {url} not ready in {timeout_s} s")


def cluster_tree(up: subprocess.Popen[bytes]) -> list[psutil.Process]:
    root = psutil.Process(up.pid)
    return [root, *root.children(recursive=True)]


def client_conns(proc: psutil.Process, http_port: int) -> int:
    """The process's TCP connections established on ``http_port``: the client's."""
    conns = getattr(proc, "net_connections", None) or proc.connections  # psutil < 6
    return sum(
        1
        for c in conns(kind="tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == http_port
    )


def sample(
    tracks: dict[int, Track], procs: dict[int, psutil.Process], t_s: float, http_port: int
) -> None:
    for pid, proc in procs.items():
        track = tracks[pid]
        if track.exited_at_s is not None:
            continue
        try:
            with proc.oneshot():
                rss, fds = proc.memory_info().rss, proc.num_fds()
                clients = client_conns(proc, http_port)
        except psutil.Error:
            track.exited_at_s = t_s
            continue
        track.t_s.append(t_s)
        track.rss_bytes.append(rss)
        track.num_fds.append(fds)
        track.num_client_conns.append(clients)


def slope_pct_per_h(t_s: list[float], values: list[int]) -> float:
    if len(t_s) < 2 or not values[0]:
        return 0.0
    mean_t, mean_v = statistics.fmean(t_s), statistics.fmean(values)
    den = sum((t - mean_t) ** 2 for t in t_s)
    if den == 0:
        return 0.0
    slope = sum((t - mean_t) * (v - mean_v) for t, v in zip(t_s, values, strict=True)) / den
    return 100.0 * slope * 3600 / mean_v


def growth(track: Track, warmup_s: float, max_rss_pct: float, max_fds: float) -> Growth:
    keep = [i for i, t in enumerate(track.t_s) if t >= warmup_s]
    t_s = [track.t_s[i] for i in keep]
    rss = [track.rss_bytes[i] for i in keep]
    server_fds = track.server_fds()
    fds = [server_fds[i] for i in keep]
    third = len(keep) // 3
    if third < 3:
        return Growth(track.name, track.pid, len(keep), 0, 0, 0, 0, 0, 0, False, "too few samples")
    rss_mid, rss_last = statistics.median(rss[third : 2 * third]), statistics.median(rss[-third:])
    # Open fds (the client's own connections left out) follow the requests in flight; what a
    # leak raises is the floor, the fewest open at the quietest moment: leaked ones never close.
    fds_mid, fds_last = min(fds[third : 2 * third]), min(fds[-third:])
    rss_pct = 100.0 * (rss_last - rss_mid) / rss_mid
    why = []
    if rss_pct > max_rss_pct:
        why.append(f"RSS grew {rss_pct:.2f} % > {max_rss_pct} %")
    if fds_last - fds_mid > max_fds:
        why.append(f"fds grew by {fds_last - fds_mid:.0f} > {max_fds:.0f}")
    if track.exited_at_s is not None:
        why.append(f"exited at {track.exited_at_s:.0f} s")
    return Growth(
        name=track.name,
        pid=track.pid,
        num_samples=len(keep),
        rss_mid_mib=rss_mid / 2**20,
        rss_last_mib=rss_last / 2**20,
        rss_growth_pct=rss_pct,
        rss_slope_pct_per_h=slope_pct_per_h(t_s, rss),
        fds_mid=fds_mid,
        fds_last=fds_last,
        fd_growth=fds_last - fds_mid,
        is_ok=not why,
        why="; ".join(why),
    )


def plot(tracks: list[Track], warmup_s: float, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return False
    fig, (ax_rss, ax_fds) = plt.subplots(2, 1, figsize=(11, 8), sharex=True)
    for track in tracks:
        ax_rss.plot(track.t_s, [v / 2**20 for v in track.rss_bytes], label=track.name)
        ax_fds.plot(track.t_s, track.num_fds, label=track.name)
    for ax in (ax_rss, ax_fds):
        ax.axvline(warmup_s, color="grey", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
    ax_rss.set_ylabel("RSS (MiB)")
    ax_rss.set_title("baton up under steady load: RSS and open fds per process (dashed: warm-up)")
    ax_fds.set_ylabel("open fds")
    ax_fds.set_xlabel("seconds since the load started")
    ax_rss.legend(loc="upper left", fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    log_dir = out.with_suffix(".logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    up_cmd = [sys.executable, "-m", "services.launcher", "up", "--port", str(port)]
    up_cmd += ["--log-dir", str(log_dir), "--log-level", "warning", *args.up_args]
    up = subprocess.Popen(up_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    bench: subprocess.Popen[bytes] | None = None
    bench_ok = False
    try:
        wait_ready(url, up, args.ready_timeout_s)
        time.sleep(1.0)  # every child has its listeners
        counts: dict[str, int] = {}
        procs = {p.pid: p for p in cluster_tree(up)}
        tracks = {pid: Track(process_name(p, counts), pid) for pid, p in procs.items()}
        tracks[up.pid].name = "launcher"
        bench_cmd = [sys.executable, "-m", "services.bench", "--url", url, "--rate", str(args.rate)]
        bench_cmd += ["--duration-s", str(args.duration_s), "--prompt-tokens"]
        bench_cmd += [str(args.prompt_tokens), "--output-tokens", str(args.output_tokens)]
        bench_out = str(out.with_suffix(".bench.json"))
        bench_cmd += ["--seed", "1", "--quiet", "true", "--out", bench_out]
        started = time.monotonic()
        bench = subprocess.Popen(bench_cmd, stdout=subprocess.DEVNULL)
        new_pids: set[int] = set()
        while bench.poll() is None:
            t_s = time.monotonic() - started
            sample(tracks, procs, t_s, port)
            new_pids |= {p.pid for p in cluster_tree(up)} - set(procs)  # restarted children
            if args.progress:
                print(f"\r{t_s:6.0f} s", end="", file=sys.stderr, flush=True)
            time.sleep(max(0.0, args.interval_s - (time.monotonic() - started - t_s)))
        if args.progress:
            print(file=sys.stderr)
        if bench.returncode != 0:
            print(f"baton bench exited with code {bench.returncode}", file=sys.stderr)
        bench_ok = bench.returncode == 0
    finally:
        if bench is not None and bench.poll() is None:
            bench.kill()
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=90)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
    bench_summary = _bench_summary(out.with_suffix(".bench.json"))
    return report(args, list(tracks.values()), len(new_pids), bench_ok, bench_summary)


def reanalyze(args: argparse.Namespace) -> int:
    """Measure a finished run's samples again (``--reanalyze``), with this run's bounds."""
    old = json.loads(Path(args.reanalyze).read_text())
    tracks = [Track(**t) for t in old["samples"]]
    bench_ok = old["bench"].get("num_errors", 1) == 0
    return report(args, tracks, old["num_restarted"], bench_ok, old["bench"], old["command"])


def report(
    args: argparse.Namespace,
    tracks: list[Track],
    num_restarted: int,
    bench_ok: bool,
    bench_summary: dict[str, Any],
    command: str = "",
) -> int:
    out = Path(args.out)
    results = [
        growth(t, args.warmup_s, args.max_rss_growth_pct, args.max_fd_growth) for t in tracks
    ]
    is_ok = all(g.is_ok for g in results) and not num_restarted and bench_ok
    print_table(results, bench_summary)
    if num_restarted:
        print(f"processes restarted during the soak: {num_restarted}", file=sys.stderr)
    document = {
        "config": vars(args),
        "command": command or " ".join(sys.argv),
        "is_ok": is_ok,
        "num_restarted": num_restarted,
        "bench": bench_summary,
        "processes": [asdict(g) for g in results],
        "samples": [asdict(t) for t in tracks],
    }
    out.write_text(json.dumps(document, indent=1))
    png = out.with_suffix(".png")
    if plot(tracks, args.warmup_s, png):
        print(f"plot: {png}")
    print(f"json: {out}")
    return 0 if is_ok else 1


def _bench_summary(path: Path) -> dict[str, Any]:
    """The load client's totals (requests sent, good, errors), if it wrote them."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    total = data.get("total", data.get("summary", {}))
    return {k: v for k, v in total.items() if not isinstance(v, (dict, list))}


def print_table(results: list[Growth], bench: dict[str, Any]) -> None:
    header = (
        f"{'process':<12} {'pid':>7} {'n':>4} {'RSS mid':>9} {'RSS last':>9} {'growth':>8} "
        f"{'slope/h':>8} {'fds min':>7} {'(last)':>8}  verdict"
    )
    print(header)
    print("-" * len(header))
    for g in results:
        verdict = "ok" if g.is_ok else f"FAIL: {g.why}"
        print(
            f"{g.name:<12} {g.pid:>7} {g.num_samples:>4} {g.rss_mid_mib:>7.1f}Mi "
            f"{g.rss_last_mib:>7.1f}Mi {g.rss_growth_pct:>7.2f}% {g.rss_slope_pct_per_h:>7.2f}% "
            f"{g.fds_mid:>7.0f} {g.fds_last:>8.0f}  {verdict}"
        )
    if bench:
        print("load: " + ", ".join(f"{k}={v}" for k, v in bench.items()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=1800.0, help="seconds of load")
    parser.add_argument("--warmup-s", type=float, default=300.0, help="left out of the growth")
    parser.add_argument(
        "--rate",
        type=float,
        default=120.0,
        help="requests per second (default: about half "
        "of what `baton up` serves within 2 s TTFT / 100 ms TPOT on a 2-core machine)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--output-tokens", type=int, default=30)
    parser.add_argument("--interval-s", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--max-rss-growth-pct", type=float, default=1.0)
    parser.add_argument("--max-fd-growth", type=float, default=2.0)
    parser.add_argument("--ready-timeout-s", type=float, default=120.0)
    parser.add_argument("--out", default="soak.json", help="JSON here; the PNG beside it")
    parser.add_argument("--progress", action="store_true", help="elapsed seconds on stderr")
    parser.add_argument(
        "--reanalyze", default="", help="a previous run's JSON: measure its samples again"
    )
    parser.add_argument(
        "up_args", nargs="*", help="after --: more `baton up` flags (e.g. -- --num-workers 3)"
    )
    args = parser.parse_args(argv)
    if args.warmup_s >= args.duration_s:
        parser.error("--warmup-s must be shorter than --duration-s")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    sys.exit(reanalyze(arguments) if arguments.reanalyze else run(arguments))
