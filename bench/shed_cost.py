"""What one shed costs the frontends: CPU per 429 when every request is shed.

A fresh cluster as ``baton up --num-workers 1 --slo-ttft-ms 2000 --slo-tpot-ms 100`` starts
it; ``baton bench`` (one client process) sends ``--rate`` requests a second for
``--duration-s`` seconds, each asking for a first token within ``--request-ttft-ms`` (1 ns
by default, in the body's ``slo_ttft_ms``), which no worker can meet, so the frontends'
early check sheds every one. ``--lag`` instead sets the frontends' loop-lag bound to 1 µs,
so that every request is shed unread, for its loop lag (``docs/admission.md``, step 5).
The frontends' CPU over the run, less what they use idle over as long, divided by the
requests shed, is the cost of one shed. Prints a table; ``--json`` writes it::

    .venv/bin/python bench/shed_cost.py --json /tmp/shed_cost.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

from bench.overload import cpu_seconds
from services.launcher.config import UpConfig
from services.launcher.threaded import cluster_in_thread
from shared.slo import SLOConfig

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rate", type=float, default=1000.0, help="requests a second")
    p.add_argument("--duration-s", type=float, default=15.0)
    p.add_argument("--idle-s", type=float, default=5.0, help="the idle CPU is measured this long")
    p.add_argument("--request-ttft-ms", type=float, default=0.000001)
    p.add_argument("--lag", action="store_true", help="shed for the loop's lag, unread")
    p.add_argument(
        "--frontend-nice", type=int, default=UpConfig().frontend_nice, help="as baton up"
    )
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args()

    up = UpConfig(
        port=0,
        num_workers=1,
        frontend_nice=args.frontend_nice,
        namespace=f"shedcost{uuid.uuid4().hex[:6]}",
        log_dir=tempfile.mkdtemp(prefix="baton-shed-cost-"),
        slo=SLOConfig(slo_ttft_ms=2000.0, slo_tpot_ms=100.0),
        ready_timeout_s=120.0,
    )
    spec = up.cluster_spec()
    if args.lag:
        spec = replace(spec, env={**spec.env, "BATON_MAX_LOOP_LAG_MS": "0.001"})
    with tempfile.TemporaryDirectory() as tmp, cluster_in_thread(spec) as cluster:
        time.sleep(2.0)  # let the processes settle after start
        idle_before = cpu_seconds(cluster.pids).get("frontend", 0.0)
        time.sleep(args.idle_s)
        before = cpu_seconds(cluster.pids).get("frontend", 0.0)
        out = os.path.join(tmp, "bench.json")
        command = [sys.executable, "-m", "services.bench", "--url", cluster.url]
        command += ["--stages", f"{args.rate:g}:{args.duration_s:g}", "--quiet", "true"]
        command += ["--out", out]
        if not args.lag:
            command += ["--slo-ttft-ms", f"{args.request_ttft_ms:g}", "--send-slo", "true"]
        started = time.monotonic()
        subprocess.run(command, cwd=ROOT, check=True)
        wall_s = time.monotonic() - started
        after = cpu_seconds(cluster.pids).get("frontend", 0.0)
        total = json.loads(Path(out).read_text())["total"]
    idle_per_s = (before - idle_before) / args.idle_s
    used_s = after - before
    num_shed = total["num_shed"]
    per_shed_us = (used_s - idle_per_s * wall_s) / num_shed * 1e6 if num_shed else None
    row = {
        "why": "loop lag (unread)" if args.lag else "early check",
        "offered": total["num_offered"],
        "shed": num_shed,
        "completed": total["num_completed"],
        "errors": total["num_errors"],
        "frontend_cpu_s": used_s,
        "idle_cpu_s": idle_per_s * wall_s,
        "us_per_shed": per_shed_us,
        "shed_p50_ms": total["shed_latency_p50_ms"],
        "shed_p99_ms": total["shed_latency_p99_ms"],
        "client_cpu_s": total.get("client_cpu_s"),
    }
    print(
        f"{'shed for':<18} {'offered':>8} {'shed':>7} {'errors':>6} {'frontend CPU s':>14} "
        f"{'idle s':>7} {'µs/shed':>8} {'shed p50/p99 ms':>16}"
    )
    cost = f"{per_shed_us:.0f}" if per_shed_us is not None else "-"
    print(
        f"{row['why']:<18} {row['offered']:>8} {num_shed:>7} {row['errors']:>6} "
        f"{used_s:>14.2f} {row['idle_cpu_s']:>7.2f} {cost:>8} "
        f"{row['shed_p50_ms']:>7.1f}/{row['shed_p99_ms']:<8.1f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "result": row}, indent=1))


if __name__ == "__main__":
    main()
