"""Planner benchmark: a load step on a cluster that starts with one decode worker.

The cluster is what ``baton up --num-workers 1 --planner --max-workers 3 --slo-ttft-ms 2000
--slo-tpot-ms 100`` starts. ``baton bench`` (two client processes) offers the admission issue's
shape (200-token prompts, 30 output tokens, Poisson) in stages given as multiples of one
worker's capacity (``--base-rate``): by default 0.5x for 30 s, 2.5x for 60 s, 0.3x for 60 s.
It samples the planner's ``/metrics`` every second (``--watch-url``) and prints:

- the time from the step up to a second decode worker registered and reporting load;
- the time from the step until good req/s is >= 90 % of offered (over 3-second windows);
- the time from the drop until the pool is back to one worker;
- errors (failures other than sheds) over the whole run, and sheds per stage.

    .venv/bin/python bench/planner_step.py --json /tmp/step.json --plot docs/planner-step.png
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from services.launcher.config import UpConfig
from services.launcher.threaded import cluster_in_thread
from shared.slo import SLOConfig

ROOT = Path(__file__).resolve().parents[1]
WINDOW_S = 3  # good/offered is judged over this many seconds


def decode_workers(watched: dict[str, Any]) -> list[tuple[float, float]]:
    """(seconds since the start, decode workers the planner counted) per sample."""
    keys = [k for k in watched["series"] if 'role="decode"' in k or "role=" not in k]
    out = []
    for i, t in enumerate(watched["t_s"]):
        values = [watched["series"][k][i] for k in keys]
        if all(v is not None for v in values) and values:
            out.append((t, sum(values)))
    return out


def first_at(samples: list[tuple[float, float]], since_s: float, test: Any) -> float | None:
    for t, value in samples:
        if t >= since_s and test(value):
            return t - since_s
    return None


def good_within(series: dict[str, list[float]], start_s: int, end_s: int) -> float | None:
    """Seconds from ``start_s`` until the first ``WINDOW_S`` window in which good >= 90 % of
    offered, before ``end_s``."""
    for s in range(start_s, end_s - WINDOW_S + 1):
        offered = sum(series["offered"][s : s + WINDOW_S])
        good = sum(series["good"][s : s + WINDOW_S])
        if offered and good >= 0.9 * offered:
            return float(s - start_s)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base-rate", type=float, default=200.0, help="one worker's capacity, req/s")
    p.add_argument(
        "--stages", default="0.5:30,2.5:60,0.3:60", help="multiple:seconds, comma-separated"
    )
    p.add_argument("--max-workers", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--output-tokens", type=int, default=30)
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--speedup", type=float, default=1.0, help="sim engine time divisor")
    p.add_argument("--planner-mode", default="load", help="the planner's --mode: load or sla")
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--plot", default="")
    p.add_argument("--json", default="")
    args = p.parse_args()
    levels = [(float(m), float(s)) for m, s in (x.split(":") for x in args.stages.split(","))]
    stages = ",".join(f"{m * args.base_rate:g}:{s:g}" for m, s in levels)

    up = UpConfig(
        port=0,
        num_workers=1,
        planner=True,
        planner_mode=args.planner_mode,
        max_workers=args.max_workers,
        speedup=args.speedup,
        namespace=f"step{uuid.uuid4().hex[:6]}",
        log_dir=tempfile.mkdtemp(prefix="baton-step-"),
        slo=SLOConfig(slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms),
        ready_timeout_s=120.0,
    )
    with tempfile.TemporaryDirectory() as tmp, cluster_in_thread(up.cluster_spec()) as cluster:
        out = os.path.join(tmp, "bench.json")
        [planner] = cluster.planner_urls
        command = [
            sys.executable, "-m", "services.bench",
            "--url", cluster.url,
            "--stages", stages,
            "--prompt-tokens", str(args.prompt_tokens),
            "--output-tokens", str(args.output_tokens),
            "--slo-ttft-ms", str(args.slo_ttft_ms),
            "--slo-tpot-ms", str(args.slo_tpot_ms),
            "--client-procs", str(args.client_procs),
            "--watch-url", f"{planner}/metrics",
            "--watch", "baton_planner_actual_workers",
            "--metrics-url", f"{planner}/metrics",
            "--quiet", "true",
            "--out", out,
        ]  # fmt: skip
        if args.plot:
            command += ["--plot", args.plot]
        subprocess.run(command, cwd=ROOT, check=True)
        result = json.loads(Path(out).read_text())

    boundaries = result["stage_boundaries_s"]
    step_s, drop_s = boundaries[1], boundaries[2]
    workers = decode_workers(result["watched"])
    series = result["time_series"]
    before = [n for t, n in workers if t < step_s]
    workers_at_step = before[-1] if before else 0.0
    facts = {
        "workers_at_step": workers_at_step,
        # Only a step from one worker says how fast the second comes.
        "second_worker_after_step_s": (
            first_at(workers, step_s, lambda n: n >= 2) if workers_at_step < 2 else None
        ),
        "most_workers": max((n for _, n in workers), default=0.0),
        "good_90pct_after_step_s": good_within(series, int(step_s), int(drop_s)),
        "back_to_one_after_drop_s": first_at(workers, drop_s + 1, lambda n: n <= 1),
        "errors": result["total"]["num_errors"],
        "shed": result["total"]["num_shed"],
    }
    print(f"\nstages (x {args.base_rate:g} req/s): {args.stages}")
    for row in result["stages"]:
        print(
            f"  {row['label']:<12} offered {row['offered_rps']:7.1f}/s"
            f"  good {row['good_rps']:7.1f}/s ({row['good_pct']:.0f} %)"
            f"  shed {row['num_shed']}  errors {row['num_errors']}"
        )

    def show(value: float | None) -> str:
        return "never" if value is None else f"{value:.0f} s"

    checks = [
        ("a second worker serving <= 5 s after the step", facts["second_worker_after_step_s"], 5),
        ("good >= 90 % of offered <= 15 s after the step", facts["good_90pct_after_step_s"], 15),
        ("back to one worker <= 60 s after the drop", facts["back_to_one_after_drop_s"], 60),
    ]
    verdicts = []
    for name, value, bound in checks:
        ok = value is not None and value <= bound
        verdicts.append({"name": name, "ok": ok, "value_s": value})
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {show(value)}")
    ok = facts["errors"] == 0
    verdicts.append({"name": "no request failed", "ok": ok, "value": facts["errors"]})
    print(f"  {'PASS' if ok else 'FAIL'}  no request failed: {facts['errors']} errors")
    print(
        f"  decode workers at the step: {facts['workers_at_step']:.0f}; most: "
        f"{facts['most_workers']:.0f}; sheds in all: {facts['shed']}"
    )
    if args.json:
        doc = {"args": vars(args), "facts": facts, "checks": verdicts, "bench": result}
        Path(args.json).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
