"""Planner benchmark: one prefill and one decode worker, the total fixed at two, and a load
that turns from prefill-heavy to decode-heavy and back. The planner has no process to start;
it can only flip a worker's role.

The cluster is what ``baton up --num-workers 1 --num-prefill-workers 1 --planner
--max-workers 2 --max-prefill-workers 1 --min-prefill-workers 0 --max-total-workers 2
--min-total-workers 2 --slo-ttft-ms 4000`` starts, with the sim at ``--speedup`` (0.25 by
default, so that the load that fills a worker leaves the two cores room for the client) and
each worker's KV cache at ``--num-kv-blocks``. Three phases, each one
``baton bench`` run (outputs counted as in the admission issue):

1. **prefill-heavy**: long prompts, few output tokens (``--prefill-prompt-tokens``,
   ``--prefill-output-tokens``) at ``--prefill-rate`` req/s, Poisson; or, with ``--trace``,
   the Mooncake conversation trace (prompts clamped to 4,000 tokens, outputs to
   ``--prefill-output-tokens``) sped up ``--time-scale`` times (its bursts come and go
   within a planner interval, and admission sheds them: the planner sees little queue);
2. **decode-heavy**: short prompts, long outputs (``--decode-prompt-tokens``,
   ``--decode-output-tokens``) at ``--decode-rate`` req/s: the decode worker's KV cache fills;
   the planner should switch the prefill worker to decode (0 + 2);
3. **prefill-heavy** again: the decode workers' prompt queues grow; the planner should switch
   one of them back to prefill (1 + 1).

It samples the planner's ``/metrics`` every 0.2 s and prints, per phase, the requests and how
they ended, the switches the planner made (with the worker's own switch time) and when, and
whether any worker process started or stopped.

    .venv/bin/python bench/role_flip.py --json /tmp/flip.json
"""

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from services.bench.endpoint import parse_samples
from services.launcher.config import UpConfig
from services.launcher.threaded import cluster_in_thread
from shared.slo import SLOConfig

ROOT = Path(__file__).resolve().parents[1]
TRACE = Path("/work/shared/traces/mooncake_conversation_trace.jsonl")
SAMPLE_S = 0.2


PLANNER_METRICS = (
    "baton_planner_actual_workers",
    "baton_planner_role_switches_total",
    "baton_planner_role_switch_seconds",
    "baton_planner_decisions_total",
)


def read_planner(url: str) -> dict[str, float]:
    """The planner's pool gauges and switch counters, by ``name{labels}``."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=2) as resp:
        lines = resp.read().decode().splitlines()
    return parse_samples(lines, PLANNER_METRICS)


class Sampler(threading.Thread):
    """Polls the planner every ``SAMPLE_S`` until stopped; ``samples`` is (time, gauges)."""

    def __init__(self, url: str, t0: float) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.t0 = t0
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_S):
            try:
                self.samples.append((time.monotonic() - self.t0, read_planner(self.url)))
            except OSError:
                continue


def pools(gauges: dict[str, float]) -> tuple[int, int]:
    """(prefill, decode) workers the planner counts."""

    def get(role: str) -> int:
        return int(gauges.get(f'baton_planner_actual_workers{{role="{role}"}}', 0))

    return get("prefill"), get("decode")


def switch_events(samples: list[tuple[float, dict[str, float]]]) -> list[dict[str, Any]]:
    """Each switch the counters show: when it was first seen, which way, the worker's time."""
    events = []
    seen: dict[str, float] = {}

    def pools_after(t_s: float) -> tuple[int, int]:
        """The pools a second later (the planner's gauges follow the directory)."""
        later = [g for t, g in samples if t >= t_s + 1.0]
        return pools(later[0] if later else samples[-1][1])

    for t, gauges in samples:
        for key, value in gauges.items():
            if "role_switches_total" not in key:
                continue
            if value > seen.get(key, 0.0):
                way = re.search(r'from="(\w+)",to="(\w+)"', key)
                seconds = next((v for k, v in gauges.items() if "role_switch_seconds" in k), None)
                events.append(
                    {
                        "t_s": round(t, 2),
                        "from": way.group(1) if way else "?",
                        "to": way.group(2) if way else "?",
                        "switch_ms": None if seconds is None else round(seconds * 1000, 1),
                        "pools_after": pools_after(t),
                    }
                )
            seen[key] = value
    return events


def ms(value: float | None) -> str:
    """A percentile in whole milliseconds, or '-' when the phase had none."""
    return "-" if value is None else f"{value:.0f}"


def run_phase(url: str, args: list[str], out: str) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "services.bench", "--url", url, "--quiet", "true", "--out", out,
        *args,
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True)
    return json.loads(Path(out).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--speedup", type=float, default=0.25, help="sim engine time divisor")
    p.add_argument("--slo-ttft-ms", type=float, default=4000.0)
    p.add_argument(
        "--slo-tpot-ms",
        type=float,
        default=0.0,
        help="a TPOT objective too (0: none); with one, a decode worker's own long prompts "
        "stall its streams past it, and one prefill worker pays off",
    )
    p.add_argument("--phase-s", type=float, default=40.0, help="arrivals per phase")
    p.add_argument("--prefill-rate", type=float, default=8.0)
    p.add_argument("--prefill-prompt-tokens", type=int, default=4000)
    p.add_argument("--prefill-output-tokens", type=int, default=8)
    p.add_argument("--trace", action="store_true", help="prefill-heavy: the Mooncake trace")
    p.add_argument("--time-scale", type=float, default=3.0, help="Mooncake trace speed-up")
    p.add_argument("--trace-start-s", type=float, default=600.0)
    p.add_argument("--decode-rate", type=float, default=8.0)
    p.add_argument("--decode-prompt-tokens", type=int, default=1500)
    p.add_argument("--decode-output-tokens", type=int, default=300)
    p.add_argument(
        "--num-kv-blocks",
        type=int,
        default=8192,
        help="each worker's KV cache, 16-token blocks (the sim's own default: a 131k-token "
        "cache, which a decode-heavy load fills; baton up's 65,536 needs 8x the streams)",
    )
    p.add_argument("--planner-debug", action="store_true", help="log every planner decision")
    p.add_argument(
        "--planner-arg",
        action="append",
        default=[],
        help="one more baton-planner argument (repeat), e.g. --planner-arg=--max-prefill-busy=99",
    )
    p.add_argument("--json", default="")
    args = p.parse_args()

    up = UpConfig(
        port=0,
        num_workers=1,
        num_prefill_workers=1,
        planner=True,
        max_workers=2,
        max_prefill_workers=1,
        min_prefill_workers=0,
        max_total_workers=2,
        min_total_workers=2,
        speedup=args.speedup,
        namespace=f"flip{uuid.uuid4().hex[:6]}",
        log_dir=tempfile.mkdtemp(prefix="baton-flip-"),
        slo=SLOConfig(slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms),
        ready_timeout_s=120.0,
    )
    slo = ["--slo-ttft-ms", str(args.slo_ttft_ms)]
    if args.slo_tpot_ms:
        slo += ["--slo-tpot-ms", str(args.slo_tpot_ms)]
    prefill_heavy = [
        "--rate", str(args.prefill_rate),
        "--duration-s", str(args.phase_s),
        "--prompt-tokens", str(args.prefill_prompt_tokens),
        "--output-tokens", str(args.prefill_output_tokens),
        *slo,
    ]  # fmt: skip
    if args.trace:
        prefill_heavy = [
            "--trace", str(TRACE),
            "--time-scale", str(args.time_scale),
            "--trace-start-s", str(args.trace_start_s),
            "--trace-duration-s", str(args.phase_s * args.time_scale),
            "--max-output-tokens", str(args.prefill_output_tokens),
            *slo,
        ]  # fmt: skip
    decode_heavy = [
        "--rate", str(args.decode_rate),
        "--duration-s", str(args.phase_s),
        "--prompt-tokens", str(args.decode_prompt_tokens),
        "--output-tokens", str(args.decode_output_tokens),
        *slo,
    ]  # fmt: skip
    phases = [
        ("prefill-heavy", prefill_heavy),
        ("decode-heavy", decode_heavy),
        ("prefill-heavy", prefill_heavy),
    ]
    cache = ("--num-kv-blocks", str(args.num_kv_blocks))
    spec = up.cluster_spec()
    spec = dataclasses.replace(
        spec, decode_args=(*spec.decode_args, *cache), prefill_args=(*spec.prefill_args, *cache)
    )
    if args.planner_debug:
        spec = dataclasses.replace(spec, planner_args=(*spec.planner_args, "--log-level", "debug"))
    if args.planner_arg:
        spec = dataclasses.replace(spec, planner_args=(*spec.planner_args, *args.planner_arg))
    print(f"logs: {up.log_dir}")
    with tempfile.TemporaryDirectory() as tmp, cluster_in_thread(spec) as cluster:
        [planner] = cluster.planner_urls
        workers_before = sorted(p.pid for p in [*cluster.workers, *cluster.prefills])
        t0 = time.monotonic()
        sampler = Sampler(planner, t0)
        sampler.start()
        rows = []
        for i, (name, phase_args) in enumerate(phases):
            start_s = time.monotonic() - t0
            result = run_phase(cluster.url, phase_args, os.path.join(tmp, f"phase{i}.json"))
            rows.append(
                {"phase": name, "start_s": round(start_s, 2),
                 "end_s": round(time.monotonic() - t0, 2), "total": result["total"],
                 "error_samples": result.get("error_samples", [])}
            )  # fmt: skip
        sampler.stop.set()
        sampler.join()
        decisions = {k: v for k, v in read_planner(planner).items() if "decisions_total" in k}
        workers_after = sorted(p.pid for p in [*cluster.workers, *cluster.prefills])

    events = switch_events(sampler.samples)
    print(
        f"\n{'phase':<14} {'start':>6} {'end':>6} {'offered':>8} {'good':>6} {'shed':>6} "
        f"{'errors':>6} {'TTFT p50':>9} {'p99':>7} {'TPOT p50':>9} {'p99':>7}  "
        "pools (prefill+decode) at the end"
    )
    for row in rows:
        total = row["total"]
        at_end = [pools(g) for t, g in sampler.samples if t <= row["end_s"]]
        print(
            f"{row['phase']:<14} {row['start_s']:6.1f} {row['end_s']:6.1f} "
            f"{total['num_offered']:8d} {total['num_good']:6d} {total['num_shed']:6d} "
            f"{total['num_errors']:6d} {ms(total['ttft_p50_ms']):>9} {ms(total['ttft_p99_ms']):>7}"
            f" {ms(total['tpot_p50_ms']):>9} {ms(total['tpot_p99_ms']):>7}"
            f"  {'{}+{}'.format(*at_end[-1]) if at_end else '?'}"
        )
    for row in rows:
        for sample in row["error_samples"]:
            print(f"  error in {row['phase']}: {sample}")
    print("\nswitches:")
    for event in events:
        phase = next((r["phase"] for r in reversed(rows) if r["start_s"] <= event["t_s"]), "?")
        num_prefill, num_decode = event["pools_after"]
        print(
            f"  {event['t_s']:6.1f} s ({phase}): {event['from']} -> {event['to']} in "
            f"{event['switch_ms']} ms; pools now {num_prefill}+{num_decode}"
        )
    print("decisions by pool and reason:", {k.split("{")[1][:-1]: v for k, v in decisions.items()})
    same = workers_before == workers_after
    errors = sum(r["total"]["num_errors"] for r in rows)
    print(f"  worker processes unchanged (no start, no stop): {same}; errors in all: {errors}")
    if args.json:
        doc = {
            "args": vars(args),
            "phases": rows,
            "switches": events,
            "decisions": decisions,
            "worker_pids_unchanged": same,
            "samples": [{"t_s": round(t, 2), "pools": pools(g)} for t, g in sampler.samples],
        }
        Path(args.json).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
