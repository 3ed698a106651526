"""Overload benchmark: a fresh cluster (as ``baton up`` starts it) under a ladder of open-loop
load levels, or a replayed trace, with ``baton bench`` as the client.

Ladder: levels of ``--levels`` times the ``--base-rate`` (the 1x load, in req/s), each for
``--level-s`` seconds and each but the first followed by ``--after-s`` seconds at 1x, so the
recovery after each level is measured. The checks of the admission issue are printed with the
table: good req/s at every level >= 90 % of 1x; no failure but sheds; sheds answered in
<= 50 ms p99 (client side); >= 95 % good in each "after" window. Server CPU (every process,
by kind) and the client's CPU are measured over the run, and sampled once a second for a
table of the cores each kind used in each stage and those the hypervisor took for other
guests meanwhile, so where the machine is the limit shows, and when it had less of itself.

Trace: ``--trace PATH --time-scale F`` replays a trace window instead (see ``baton bench``).

``--no-admission`` starts the cluster without objectives (the client still classifies by
them), for a before/after comparison. Run from the repository root::

    .venv/bin/python bench/overload.py --workers 1 --json /tmp/ladder.json
    .venv/bin/python bench/overload.py --workers 2 --base-rate 400 --levels 1 2 4
    .venv/bin/python bench/overload.py --trace ../shared/traces/azure_llm_2023_code.csv \\
        --time-scale 2 --trace-duration-s 300 --length-scale 0.25
"""

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from services.bench.endpoint import parse_samples
from services.launcher.config import UpConfig
from services.launcher.threaded import cluster_in_thread
from shared.slo import SLOConfig

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("services.frontend", "services.worker", "services.router", "nats-server", "etcd")


def cpu_seconds(pids: list[int]) -> dict[str, float]:
    """utime + stime by kind of process, children included."""
    out: dict[str, float] = {}
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    cmd = " ".join(proc.cmdline())
                    label = next((x for x in LABELS if x in cmd), proc.name())
                    label = label.removeprefix("services.")
                    t = proc.cpu_times()
                    out[label] = out.get(label, 0.0) + t.user + t.system
    return out


CpuSample = tuple[float, dict[str, float]]  # wall clock, CPU seconds so far by kind
STOLEN = "stolen"  # not a process: CPU time the hypervisor gave to other guests


def stolen_seconds() -> float | None:
    """The machine's CPU time stolen by its hypervisor so far (Linux ``/proc/stat``: the
    eighth field of the ``cpu`` line), or None where it cannot be read. On a shared virtual
    machine it is what other guests took from this one's cores while it had work."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def sample_cpu(pids: list[int], stop: threading.Event, into: list[CpuSample]) -> None:
    """Append the cluster's CPU seconds so far, by kind, and the machine's stolen seconds,
    once a second until ``stop`` is set. (The client's CPU a second is in the bench's own
    time series.)"""
    while not stop.is_set():
        now = time.time()
        used = cpu_seconds(pids)
        stolen = stolen_seconds()
        if stolen is not None:
            used[STOLEN] = stolen
        into.append((now, used))
        stop.wait(1.0 - (time.time() - now) % 1.0)


def cores_by_stage(
    samples: list[CpuSample], result: dict[str, Any]
) -> list[tuple[str, dict[str, float]]]:
    """Cores used by each kind of process in each stage: the cluster's between the samples
    nearest the stage's start and end (``sample_cpu``), the client's from the bench's own
    CPU seconds a second over the stage."""
    started = datetime.fromisoformat(result["started_at"]).timestamp()
    series = result["time_series"]
    client_by_second = list(zip(series["t_s"], series.get("client_cpu_s") or [], strict=False))
    rows = []
    for stage in result["stages"]:
        start = started + stage["start_s"]
        end = start + stage["duration_s"]
        first = min(samples, key=lambda s: abs(s[0] - start))
        last = min(samples, key=lambda s: abs(s[0] - end))
        span = last[0] - first[0]
        if span <= 0:
            continue
        kinds = last[1].keys() | first[1].keys()
        used = {k: (last[1].get(k, 0.0) - first[1].get(k, 0.0)) / span for k in kinds}
        in_stage = [
            cpu_s
            for t_s, cpu_s in client_by_second
            if stage["start_s"] <= t_s < stage["start_s"] + stage["duration_s"]
        ]
        if in_stage:
            used["client"] = sum(in_stage) / len(in_stage)
        rows.append((stage["label"], used))
    return rows


def print_cores(rows: list[tuple[str, dict[str, float]]]) -> None:
    """The table of ``cores_by_stage``: each kind's cores, their total, and the cores the
    hypervisor took for other guests meanwhile (a share of a saturated machine this run did
    not have)."""
    kinds = sorted({k for _, used in rows for k, v in used.items() if v >= 0.005} - {STOLEN})
    print(f"\ncores used, by stage ({os.cpu_count()} on this machine)")
    head = " ".join(f"{k[:11]:>11}" for k in kinds)
    print(f"{'stage':<12} {head} {'total':>7} {'stolen':>7}")
    for label, used in rows:
        cells = " ".join(f"{used.get(k, 0.0):>11.2f}" for k in kinds)
        total = sum(v for k, v in used.items() if k != STOLEN)
        stolen = f"{used[STOLEN]:.2f}" if STOLEN in used else "-"
        print(f"{label:<12} {cells} {total:>7.2f} {stolen:>7}")


def stages(args: argparse.Namespace) -> str:
    parts = []
    for i, level in enumerate(args.levels):
        parts.append(f"{level * args.base_rate:g}:{args.level_s:g}")
        if i and args.after_s > 0:
            parts.append(f"{args.base_rate:g}:{args.after_s:g}")
    return ",".join(parts)


def bench_command(args: argparse.Namespace, url: str, out: str) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "services.bench",
        "--url",
        url,
        "--slo-ttft-ms",
        str(args.slo_ttft_ms),
        "--slo-tpot-ms",
        str(args.slo_tpot_ms),
        "--client-procs",
        str(args.client_procs),
        "--quiet",
        "true",
        "--out",
        out,
        "--metrics-url",
        f"{url}/metrics",
    ]
    if args.plot:
        command += ["--plot", args.plot]
    if args.watch_sheds:
        watch = ",".join((*SHED_SERIES, LAG_SERIES))
        command += ["--watch-url", f"{url}/metrics", "--watch", watch]
    if args.trace:
        command += ["--trace", args.trace, "--time-scale", str(args.time_scale)]
        command += ["--length-scale", str(args.length_scale)]
        command += ["--trace-duration-s", str(args.trace_duration_s)]
        command += ["--trace-start-s", str(args.trace_start_s)]
    else:
        command += ["--stages", stages(args)]
        command += ["--prompt-tokens", str(args.prompt_tokens)]
        command += ["--output-tokens", str(args.output_tokens)]
    return command


def checks(result: dict[str, Any], args: argparse.Namespace) -> list[tuple[str, bool, str]]:
    """The admission issue's criteria, on the ladder's stages."""
    rows = result["stages"]
    base = rows[0]["good_rps"] or 0.0
    levels = rows[:1] + [rows[i] for i in range(1, len(rows), 2)]
    afters = [rows[i] for i in range(2, len(rows), 2)]
    worst = min(r["good_rps"] for r in levels)
    errors = sum(r["num_errors"] for r in rows)
    shed_p99 = max((r["shed_latency_p99_ms"] or 0.0) for r in rows)
    after_pct = min((r["good_pct"] for r in afters), default=100.0)
    return [
        (
            "good req/s at every level >= 90 % of 1x",
            base > 0 and worst >= 0.9 * base,
            f"{worst / base:.0%}" if base > 0 else "nothing good at 1x",
        ),
        ("no failure but sheds", errors == 0, f"{errors} errors"),
        ("sheds answered in <= 50 ms p99", shed_p99 <= 50.0, f"worst stage p99 {shed_p99:.0f} ms"),
        (">= 95 % good in the windows after", after_pct >= 95.0, f"worst {after_pct:.0f} %"),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", type=int, default=1, help="decode workers")
    p.add_argument("--prefill", type=int, default=0, help="prefill workers")
    p.add_argument(
        "--frontends", type=int, default=0, help="frontend processes (0: as baton up chooses)"
    )
    p.add_argument(
        "--frontend-nice",
        type=int,
        default=UpConfig().frontend_nice,
        help="niceness added to the frontends (default: baton up's)",
    )
    p.add_argument("--base-rate", type=float, default=200.0, help="the 1x load, req/s")
    p.add_argument("--levels", type=float, nargs="+", default=[1, 2, 4, 10])
    p.add_argument("--level-s", type=float, default=15.0)
    p.add_argument("--after-s", type=float, default=5.0)
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--output-tokens", type=int, default=30)
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--no-admission", action="store_true", help="serve without objectives")
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--speedup", type=float, default=1.0, help="sim engine time divisor")
    p.add_argument("--trace", default="")
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--length-scale", type=float, default=1.0)
    p.add_argument("--trace-start-s", type=float, default=0.0)
    p.add_argument("--trace-duration-s", type=float, default=300.0)
    p.add_argument("--env", nargs="*", default=[], help="KEY=VALUE for every service")
    p.add_argument("--plot", default="", help="PNG of the run (baton bench --plot)")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument(
        "--watch-sheds",
        action="store_true",
        help=(
            "sample the frontends' shed counters and loop lag once a second: the sheds by "
            "kind and the worst lag in each stage"
        ),
    )
    args = p.parse_args()

    objectives = 0.0 if args.no_admission else 1.0
    up = UpConfig(
        port=0,
        num_workers=args.workers,
        num_prefill_workers=args.prefill,
        num_frontends=args.frontends,
        frontend_nice=args.frontend_nice,
        speedup=args.speedup,
        namespace=f"overload{uuid.uuid4().hex[:6]}",
        log_dir=tempfile.mkdtemp(prefix="baton-overload-"),
        slo=SLOConfig(
            slo_ttft_ms=args.slo_ttft_ms * objectives, slo_tpot_ms=args.slo_tpot_ms * objectives
        ),
        ready_timeout_s=120.0,
    )
    spec = up.cluster_spec()
    extra = dict(kv.split("=", 1) for kv in args.env)
    spec = replace(spec, env={**spec.env, **extra})
    with tempfile.TemporaryDirectory() as tmp, cluster_in_thread(spec) as cluster:
        out = os.path.join(tmp, "bench.json")
        before = cpu_seconds(cluster.pids)
        started = time.monotonic()
        samples: list[CpuSample] = []
        stop = threading.Event()
        sampler = threading.Thread(
            target=sample_cpu, args=(cluster.pids, stop, samples), daemon=True
        )
        sampler.start()
        try:
            subprocess.run(bench_command(args, cluster.url, out), cwd=ROOT, check=True)
        finally:
            stop.set()
            sampler.join()
        wall_s = time.monotonic() - started
        after = cpu_seconds(cluster.pids)
        result = json.loads(Path(out).read_text())
    cores = cores_by_stage(samples, result)
    server_cpu = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    admission = "without objectives (admission off)" if args.no_admission else "with objectives"
    print(f"\n{args.workers} decode + {args.prefill} prefill worker(s), {admission}")
    header = f"{'stage':<12} {'offered/s':>9} {'good/s':>8} {'good%':>6} {'shed':>6} {'errors':>6}"
    header += f" {'shed p99 ms':>11} {'new conn':>8} {'kept-alive p99':>14}"
    print(f"{header} {'TTFT p50/p99 ms':>16} {'TPOT p50/p99 ms':>16}")
    for row in [*result["stages"], result["total"]]:
        print(
            f"{row['label']:<12} {row['offered_rps']:>9.1f} {row['good_rps']:>8.1f} "
            f"{row['good_pct']:>6.0f} {row['num_shed']:>6} {row['num_errors']:>6} "
            f"{_ms(row['shed_latency_p99_ms']):>11} {row['num_shed_new_connection']:>8} "
            f"{_ms(row['shed_latency_p99_kept_alive_ms']):>14} "
            f"{_pair(row, 'ttft'):>16} {_pair(row, 'tpot'):>16}"
        )
    cpu = ", ".join(f"{k} {v:.1f}" for k, v in sorted(server_cpu.items(), key=lambda x: -x[1]))
    print(f"server CPU s over {wall_s:.0f} s: {cpu} (total {sum(server_cpu.values()):.1f})")
    print(f"client CPU s: {result['client_cpu_s']:.1f} over {result['client_procs']} process(es)")
    print(f"sheds as the frontends counted them: {shed_breakdown(result['server_metrics'])}")
    if not args.trace:
        print_cores(cores)
    print_sheds(sheds_by_stage(result), lag_by_stage(result))
    verdicts = [] if args.trace else checks(result, args)
    for name, ok, detail in verdicts:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")
    if args.json:
        doc = {
            "args": vars(args),
            "bench": result,
            "server_cpu_s": server_cpu,
            "wall_s": wall_s,
            "cores_by_stage": [{"stage": label, **used} for label, used in cores],
            "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in verdicts],
        }
        Path(args.json).write_text(json.dumps(doc, indent=1))


WHERE = ("connection", "handler")  # where a frontend sheds before reading
# The frontends' shed counters --watch-sheds samples: unread (loop lag), and by stage.
SHED_SERIES = ("baton_frontend_overload_sheds_total", "baton_frontend_shed_seconds_count")
LAG_SERIES = "baton_frontend_loop_lag_seconds"  # one series a frontend process


def sheds_by_stage(result: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """How many requests the frontends shed in each stage, by kind ("unread": before the
    body was read, the loop lagging; else the ``stage`` label: frontend, sending, worker,
    waiting), from the counters sampled once a second (``--watch-sheds``); [] without them.
    Counts near a stage's edges may fall on either side: a sample is taken up to half a
    second from each edge, the scrape itself runs late when the frontend's loop lags, and
    the frontend process that answers it reports the others' counters from snapshots up to
    a second old (``SNAPSHOT_INTERVAL_S``). Right after a 10x level that can move hundreds of
    its sheds into the window after it; within a stage the counts hold."""
    watched = result.get("watched")
    if not watched or not watched["t_s"]:
        return []
    t_s: list[float] = watched["t_s"]
    totals: dict[str, list[float]] = {}
    for key, values in watched["series"].items():
        name, _, labels = key.partition("{")
        if name == LAG_SERIES:
            continue
        if name == SHED_SERIES[0]:
            kind = "unread"
        else:
            kind = labels.partition('stage="')[2].partition('"')[0] or "?"
        column = totals.setdefault(kind, [0.0] * len(t_s))
        for i, value in enumerate(values):
            column[i] += value or 0.0  # a labelled series is missing until its first count
    rows = []
    for stage in result["stages"]:
        start, end = stage["start_s"], stage["start_s"] + stage["duration_s"]
        first = min(range(len(t_s)), key=lambda i: abs(t_s[i] - start))
        last = min(range(len(t_s)), key=lambda i: abs(t_s[i] - end))
        rows.append((stage["label"], {k: v[last] - v[first] for k, v in totals.items()}))
    return rows


def lag_by_stage(result: dict[str, Any]) -> list[float | None]:
    """The highest loop lag (seconds) any frontend process showed in each stage's samples
    (``--watch-sheds``; the gauge is smoothed over about 100 ms); None for a stage with no
    sample, [] without any."""
    watched = result.get("watched")
    if not watched or not watched["t_s"]:
        return []
    t_s: list[float] = watched["t_s"]
    lags = [v for k, v in watched["series"].items() if k.partition("{")[0] == LAG_SERIES]
    worst: list[float | None] = []
    for stage in result["stages"]:
        start, end = stage["start_s"], stage["start_s"] + stage["duration_s"]
        values = [
            value
            for series in lags
            for t, value in zip(t_s, series, strict=True)
            if start <= t < end and value is not None
        ]
        worst.append(max(values) if values else None)
    return worst


def print_sheds(rows: list[tuple[str, dict[str, float]]], lags: list[float | None]) -> None:
    if not rows:
        return
    kinds = sorted({k for _, counts in rows for k in counts})
    print("\nsheds by kind, by stage (the frontends' counters, sampled once a second)")
    print(f"{'stage':<12} " + " ".join(f"{k:>9}" for k in kinds) + f" {'max lag ms':>10}")
    for i, (label, counts) in enumerate(rows):
        lag = lags[i] if i < len(lags) else None
        cells = " ".join(f"{counts.get(k, 0.0):>9.0f}" for k in kinds)
        print(
            f"{label:<12} {cells} " + (f"{lag * 1e3:>10.0f}" if lag is not None else f"{'-':>10}")
        )


# The early check's sheds made from the request's bytes, before aiohttp parsed them.
CONNECTION_CHECKS = "baton_frontend_connection_capacity_sheds_total"


def shed_breakdown(metrics: dict[str, list[str]]) -> str:
    """Where the server shed, from its /metrics before and after the run: before reading the
    body (its loop lagged), and by stage (frontend, sending, worker, waiting) with the mean
    time from arrival to the 429 as the frontend measured it and how many took over 50 ms
    (the client's figure adds the queues before the frontend reads the request)."""
    names: tuple[str, ...] = (
        "baton_frontend_overload_sheds_total",
        "baton_frontend_shed_seconds_count",
    )
    names += ("baton_frontend_shed_seconds_sum", "baton_frontend_shed_seconds_bucket")
    names += (CONNECTION_CHECKS,)
    before = parse_samples(metrics["before"], names)
    after = parse_samples(metrics["after"], names)
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    unread = {
        w: delta.get(f'baton_frontend_overload_sheds_total{{where="{w}"}}', 0.0) for w in WHERE
    }
    early = f"{unread['connection']:.0f} by their connection"
    parts = [f"before reading {sum(unread.values()):.0f} ({early})"]
    for stage in ("frontend", "sending", "worker", "waiting"):
        count = delta.get(f'baton_frontend_shed_seconds_count{{stage="{stage}"}}', 0.0)
        total = delta.get(f'baton_frontend_shed_seconds_sum{{stage="{stage}"}}', 0.0)
        within = sum(v for k, v in delta.items() if f'stage="{stage}"' in k and 'le="0.05"' in k)
        mean = (
            f" (mean {total / count * 1000:.1f} ms, {count - within:.0f} over 50)" if count else ""
        )
        if stage == "frontend":
            mean += f" ({delta.get(CONNECTION_CHECKS, 0.0):.0f} by their connection)"
        parts.append(f"{stage} {count:.0f}{mean}")
    return ", ".join(parts)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _pair(row: dict[str, Any], what: str) -> str:
    p50, p99 = row[f"{what}_p50_ms"], row[f"{what}_p99_ms"]
    if p50 is None or p99 is None:
        return "-"
    return f"{p50:.0f}/{p99:.0f}"


if __name__ == "__main__":
    main()
