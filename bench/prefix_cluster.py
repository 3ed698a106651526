"""Prefix-sharing workload on a real cluster: the Mooncake trace against each routing mode.

For each of ``--modes`` (default kv, then round_robin) it starts a fresh cluster as ``baton up``
does (``services.launcher``: nats, etcd, one router in that mode, ``--workers``
simulated decode workers, the frontend), replays the same requests of
``/work/shared/traces/mooncake_conversation_trace.jsonl`` through ``/v1/completions`` as
streaming token-id prompts (mapping and replay: ``bench/prefix_replay.py``), and stops it.
Reported per mode: completed and errors, prefix-cache hit rate (sum of the responses'
``cached_tokens``, the workers' real prefix hits, over sum of prompt tokens), TTFT p50/p99 in
wall milliseconds, throughput, and the busiest worker's share of the load: its routing
decisions (the router's ``baton_router_worker_decisions``, warm-up excluded) over the mean.
The router's own estimate of the hit rate and how many requests it placed (the frontend
places a request itself when the router misses its 50 ms deadline) are reported too.

Defaults, and why:

- ``--requests 2000``: the first 2,000 rows (669 s of trace; a request averages 27 trace
  blocks, 352 output tokens; with an unbounded cache 29 % of their blocks repeat an earlier
  one).
- ``--block-tokens 16`` (one trace block = one engine block) and ``--output-divisor 32``:
  prompts of ~440 tokens (up to ~3,900), outputs of ~11 tokens, as ``prefix_workload.py``.
- ``--speedup 0.1``: the engine runs ten times slower than the sim's ~1B-on-one-GPU model, so
  modelled GPU time, not the CPU of a 2-core machine running nine server processes and the
  client, sets the latencies: a decode step takes 60-160 ms, a typical prefill ~120 ms.
- ``--time-scale 12``: trace time runs 12 times faster (~36 requests/s, bursts of up to 19
  at once), ~56 s per mode. Relative to the engine that is the load ``prefix_workload.py``
  calls speedup 120 (12 / 0.1), and the two agree (TTFT p50 ~37 vs ~48 modelled ms, kv vs
  round_robin, in both). It is the busy side of the knee: queues form in bursts and drain
  (round_robin's TTFT p50 is ~4x a typical prefill, its p99 ~3.5x its p50), while the
  servers use ~8 CPU seconds per minute. Measured here: at ``--time-scale 6`` kv leads by
  ~7 % (p50) and ~18 % (p99); at 12 by ~23 % and ~31 %; at 24 the queue runs away (TTFT
  p50 5-6 s, the client's cap fills) and the comparison says little.
- ``--num-kv-blocks 4096`` per worker (64k tokens): the 2,000 requests touch ~39,000 distinct
  blocks, so no worker can keep all of them and where a prefix goes decides whether it is
  still cached when it comes back. ``--max-num-seqs 256`` as ``prefix_workload.py``.

The router runs with its own defaults (no per-trace tuning); ``BATON_ROUTER_*`` variables in
the environment reach it, ``BATON_DECODE_*`` the workers. Run from the repository root::

    .venv/bin/python bench/prefix_cluster.py
    .venv/bin/python bench/prefix_cluster.py --modes kv round_robin least_loaded random \\
        --json /tmp/prefix_cluster.json
"""

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import statistics
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
from prefix_replay import TRACE, Outcome, TraceRequest, load_trace, replay

from services.launcher.config import UpConfig
from services.launcher.threaded import cluster_in_thread

ENGINE_BLOCK_SIZE = 16
_DECISIONS = re.compile(r'^baton_router_worker_decisions_total\{worker="([^"]+)"\} (\S+)$', re.M)
_ROUTER_HIT = re.compile(r"^baton_router_overlap_hit_rate (\S+)$", re.M)


@dataclass(frozen=True, slots=True)
class Cluster:
    url: str
    router_metrics_url: str
    pids: list[int]


def _get(url: str, timeout_s: float = 2.0) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            body: bytes = resp.read()
            return body
    except (OSError, urllib.error.URLError):
        return None


def cluster_env(args: argparse.Namespace, max_model_len: int) -> dict[str, str]:
    """The services' settings, but those already set in the environment (which win)."""
    settings = {
        "BATON_DECODE_NUM_KV_BLOCKS": str(args.num_kv_blocks),
        "BATON_DECODE_MAX_NUM_SEQS": str(args.max_num_seqs),
        "BATON_DECODE_MAX_MODEL_LEN": str(max(8192, max_model_len)),
    }
    return {name: value for name, value in settings.items() if name not in os.environ}


@contextlib.contextmanager
def local_cluster(args: argparse.Namespace, mode: str, max_model_len: int) -> Iterator[Cluster]:
    """A fresh cluster routing in ``mode``, started as ``baton up`` does; stopped on exit."""
    up = UpConfig(
        port=0,
        num_workers=args.workers,
        num_routers=1,
        router_mode=mode,
        speedup=args.speedup,
        namespace=f"prefix{uuid.uuid4().hex[:6]}",
        log_dir=str(Path(args.log_dir) / mode),
        ready_timeout_s=120.0,
    )
    spec = replace(up.cluster_spec(), env=cluster_env(args, max_model_len))
    with cluster_in_thread(spec) as cluster:
        pids = [*cluster.pids]
        for pid in cluster.pids:  # and their children (a shared-memory resource tracker)
            with contextlib.suppress(psutil.NoSuchProcess):
                pids += [c.pid for c in psutil.Process(pid).children(recursive=True)]
        yield Cluster(cluster.url, f"{cluster.router_urls[0]}/metrics", pids)


def router_state(cluster: Cluster) -> tuple[dict[str, float], float]:
    """(decisions per worker, the router's estimated hit rate) from the router's metrics."""
    body = _get(cluster.router_metrics_url)
    text = body.decode() if body else ""
    decisions = {worker: float(n) for worker, n in _DECISIONS.findall(text)}
    hit = _ROUTER_HIT.search(text)
    return decisions, float(hit.group(1)) if hit else math.nan


def warm_up(cluster: Cluster, num_workers: int, model: str) -> None:
    """Short requests (under one block: nothing cached) until the router has answered
    ``num_workers`` of them, so the frontend's tokenizer and the router's view of the workers
    and the model are loaded before the clock starts."""
    body = json.dumps({"model": model, "prompt": list(range(1, 9)), "max_tokens": 1}).encode()
    end = time.monotonic() + 30
    while sum(router_state(cluster)[0].values()) < num_workers:
        if time.monotonic() > end:
            raise RuntimeError("the router answered no warm-up request in 30 s")
        request = urllib.request.Request(
            f"{cluster.url}/v1/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            resp.read()


def cpu_s(pids: list[int]) -> float:
    """utime + stime of these processes (each once; a process gone counts nothing)."""
    total = 0.0
    for pid in set(pids):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def _pct(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


def summarize(
    mode: str,
    outcomes: list[Outcome],
    decisions: dict[str, float],
    router_hit_rate: float,
    cpu: dict[str, float],
    num_workers: int,
) -> dict[str, Any]:
    ok = [o for o in outcomes if not o.error]
    ttft_ms = [o.ttft_s * 1e3 for o in ok]
    num_prompt = sum(o.num_prompt_tokens for o in ok)
    num_output = sum(o.num_output_tokens for o in ok)
    wall_s = max((o.end_s for o in outcomes), default=0.0) - min(
        (o.due_s for o in outcomes), default=0.0
    )
    per_worker = sorted(decisions.values(), reverse=True)
    per_worker += [0.0] * (num_workers - len(per_worker))  # a worker never chosen has no label
    mean = statistics.fmean(per_worker) if per_worker else math.nan
    return {
        "mode": mode,
        "num_requests": len(outcomes),
        "num_completed": len(ok),
        "num_errors": len(outcomes) - len(ok),
        "errors": dict(Counter(o.error for o in outcomes if o.error).most_common()),
        "hit_rate": sum(o.num_cached_tokens for o in ok) / num_prompt if num_prompt else math.nan,
        "router_hit_rate": router_hit_rate,
        "ttft_ms": {
            "p50": _pct(ttft_ms, 50),
            "p90": _pct(ttft_ms, 90),
            "p99": _pct(ttft_ms, 99),
            "mean": statistics.fmean(ttft_ms) if ttft_ms else math.nan,
        },
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else math.nan,
        "output_tokens_per_s": num_output / wall_s if wall_s > 0 else math.nan,
        "prompt_tokens_per_s": num_prompt / wall_s if wall_s > 0 else math.nan,
        "decisions_per_worker": [int(n) for n in per_worker],
        "num_router_decisions": int(sum(per_worker)),
        "busiest_share": per_worker[0] / mean if per_worker and mean > 0 else math.nan,
        "max_send_lag_ms": max((o.send_lag_s for o in outcomes), default=0.0) * 1e3,
        "num_sent_late": sum(1 for o in outcomes if o.send_lag_s > 0.05),
        **cpu,
    }


def run_mode(
    args: argparse.Namespace, mode: str, requests: list[TraceRequest], max_model_len: int
) -> dict[str, Any]:
    """One fresh cluster in ``mode``, the whole replay, its summary."""
    with local_cluster(args, mode, max_model_len) as cluster:
        warm_up(cluster, args.workers, args.model)
        decisions_before, _ = router_state(cluster)
        server_cpu_before, client_cpu_before = cpu_s(cluster.pids), time.process_time()
        print(
            f"[{mode}] cluster up at {cluster.url}; replaying {len(requests)} requests", flush=True
        )
        outcomes = asyncio.run(
            replay(
                cluster.url,
                args.model,
                requests,
                time_scale=args.time_scale,
                max_in_flight=args.max_in_flight,
                request_timeout_s=args.request_timeout_s,
            )
        )
        cpu = {
            "client_cpu_s": time.process_time() - client_cpu_before,
            "server_cpu_s": cpu_s(cluster.pids) - server_cpu_before,
        }
        decisions_after, router_hit_rate = router_state(cluster)
    decisions = {
        worker: n - decisions_before.get(worker, 0.0) for worker, n in decisions_after.items()
    }
    return summarize(mode, outcomes, decisions, router_hit_rate, cpu, args.workers)


def format_table(results: list[dict[str, Any]]) -> str:
    header = (
        f"{'mode':<13} {'done':>9} {'err':>4} {'hit':>6} {'est.hit':>7} {'TTFT p50':>9} "
        f"{'p90':>8} {'p99':>8} {'req/s':>6} {'out tok/s':>9} {'busiest':>7}  decisions per worker"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        done = f"{r['num_completed']}/{r['num_requests']}"
        ttft = r["ttft_ms"]
        lines.append(
            f"{r['mode']:<13} {done:>9} {r['num_errors']:>4} {r['hit_rate']:>6.3f} "
            f"{r['router_hit_rate']:>7.3f} {ttft['p50']:>9.1f} {ttft['p90']:>8.1f} "
            f"{ttft['p99']:>8.1f} {r['requests_per_s']:>6.1f} {r['output_tokens_per_s']:>9.0f} "
            f"{r['busiest_share']:>6.2f}x  {r['decisions_per_worker']}"
        )
    return "\n".join(lines)


def verdict(results: list[dict[str, Any]], max_share: float) -> str:
    """The acceptance check: kv beats round_robin on TTFT with no worker over ``max_share``."""
    by_mode = {r["mode"]: r for r in results}
    kv, rr = by_mode.get("kv"), by_mode.get("round_robin")
    if kv is None or rr is None:
        return "verdict: needs both kv and round_robin in --modes"
    p50 = kv["ttft_ms"]["p50"] / rr["ttft_ms"]["p50"] - 1
    p99 = kv["ttft_ms"]["p99"] / rr["ttft_ms"]["p99"] - 1
    is_faster = p50 < 0 and p99 < 0
    is_balanced = kv["busiest_share"] <= max_share
    outcome = "PASS" if is_faster and is_balanced and not kv["num_errors"] else "FAIL"
    return (
        f"verdict: {outcome}: kv vs round_robin TTFT p50 {p50:+.0%}, p99 {p99:+.0%}; hit rate "
        f"{kv['hit_rate']:.3f} vs {rr['hit_rate']:.3f}; kv busiest worker "
        f"{kv['busiest_share']:.2f}x the mean (limit {max_share:g}x)"
    )


def _nan_to_none(value: Any) -> Any:
    """JSON has no NaN: unmeasured numbers are written as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--trace", type=Path, default=TRACE)
    p.add_argument("--requests", type=int, default=2000, help="replay the first N requests")
    p.add_argument("--modes", nargs="+", default=["kv", "round_robin"], help="router modes")
    p.add_argument("--workers", type=int, default=4, help="decode workers")
    p.add_argument("--speedup", type=float, default=0.1, help="sim engine time divisor")
    p.add_argument("--time-scale", type=float, default=12.0, help="trace time divisor")
    p.add_argument("--block-tokens", type=int, default=16, help="tokens per trace block")
    p.add_argument("--output-divisor", type=int, default=32, help="output_length divisor")
    p.add_argument("--num-kv-blocks", type=int, default=4096, help="KV blocks per worker")
    p.add_argument("--max-num-seqs", type=int, default=256, help="batch limit per worker")
    p.add_argument("--max-in-flight", type=int, default=1000, help="client's open requests cap")
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--max-share", type=float, default=1.5, help="busiest/mean load allowed")
    p.add_argument("--model", default="baton-sim")
    p.add_argument("--log-dir", default="", help="cluster logs (default: a new temp dir)")
    p.add_argument("--json", default="", help="write the results here as JSON")
    args = p.parse_args(argv)
    for name in ("requests", "workers", "block_tokens", "output_divisor", "max_in_flight"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.speedup <= 0 or args.time_scale <= 0:
        p.error("--speedup and --time-scale must be > 0")
    args.log_dir = args.log_dir or tempfile.mkdtemp(prefix="baton-prefix-")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    requests = load_trace(args.trace, args.requests, args.block_tokens, args.output_divisor)
    max_model_len = max(len(r.token_ids) + r.max_tokens for r in requests)
    max_blocks = -(-max_model_len // ENGINE_BLOCK_SIZE)
    if max_blocks > args.num_kv_blocks:
        raise SystemExit(f"the longest request needs {max_blocks} KV blocks; --num-kv-blocks")
    span_s = requests[-1].arrival_s / args.time_scale
    print(
        f"{len(requests)} requests over {span_s:.0f} s (trace / {args.time_scale:g}), "
        f"{args.workers} workers x {args.num_kv_blocks} KV blocks, speedup {args.speedup:g}, "
        f"prompts {statistics.fmean(len(r.token_ids) for r in requests):.0f} tokens on average, "
        f"outputs {statistics.fmean(r.max_tokens for r in requests):.1f}; logs in {args.log_dir}",
        flush=True,
    )
    results = []
    for mode in args.modes:
        results.append(run_mode(args, mode, requests, max_model_len))
        r = results[-1]
        print(
            f"[{mode}] done: {r['num_completed']}/{r['num_requests']}, TTFT p50 "
            f"{r['ttft_ms']['p50']:.1f} ms, server CPU {r['server_cpu_s']:.0f} s, client CPU "
            f"{r['client_cpu_s']:.0f} s, max send lag {r['max_send_lag_ms']:.0f} ms, router "
            f"placed {r['num_router_decisions']}/{r['num_requests']}",
            flush=True,
        )
    print(format_table(results))
    print("TTFT in wall ms (x speedup = modelled ms); hit = cached / prompt tokens (workers);")
    print("est.hit = the router's estimate; busiest = max / mean routing decisions per worker")
    print(verdict(results, args.max_share))
    if args.json:
        report = {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
            "results": results,
        }
        Path(args.json).write_text(json.dumps(_nan_to_none(report), indent=2) + "\n")


if __name__ == "__main__":
    main()
