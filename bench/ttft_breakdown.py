"""Where a disaggregated request's time to first token goes, from the services' own metrics.

Starts a cluster (``services.launcher``, as ``baton up``) with one prefill and one decode worker,
forces every prompt to the prefill worker, sends prompts one at a time (so queueing is only
what the system adds), then reads the frontend's ``baton_frontend_ttft_phase_seconds``
histograms: queue (waiting on the prefill worker), prefill (its compute), transfer (the KV
handoff, measured by the decode worker) and other (routing, placement, delivery). In this
prefill-first design the first token is the one the prefill worker sampled, streamed at the
handoff, so the first decode step is not on the TTFT path; the client-side gap between the
first and the second token is reported beside it as "first decode step".

    .venv/bin/python bench/ttft_breakdown.py --engine torch --prompt-tokens 1024 --requests 20
    .venv/bin/python bench/ttft_breakdown.py --engine sim --kv-transfer tcp --json /tmp/t.json
    .venv-vllm/bin/python bench/ttft_breakdown.py --engine vllm --kv-transfer tcp

A token of a real model may decode to no text (part of a character, a special token); with
the torch and vllm engines each request asks for log-probabilities, so that every token
comes as an event of its own and its arrival is seen.
"""

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import aiohttp

from services.launcher.cluster import ClusterSpec
from services.launcher.config import UpConfig
from services.launcher.threaded import cluster_in_thread

PHASES = ("queue", "prefill", "transfer", "other")


def cluster_spec(args: argparse.Namespace, log_dir: str) -> ClusterSpec:
    """One prefill and one decode worker, as ``baton up`` starts them, every prompt remote."""
    up = UpConfig(
        port=0,
        num_workers=1,
        num_prefill_workers=1,
        engine=args.engine,
        log_dir=log_dir,
        namespace=f"ttft{uuid.uuid4().hex[:6]}",
        log_level="warning",
    )
    env = {
        "BATON_ROUTER_MIN_REMOTE_PREFILL_TOKENS": "1",
        "BATON_ROUTER_MIN_REMOTE_PREFILL_FRACTION": "0",
        "BATON_ROUTER_MAX_REMOTE_PREFILL_EXTRA_WAIT_S": "inf",  # however long its queue
        "BATON_KV_TRANSFER": args.kv_transfer,
        "BATON_MAX_MODEL_LEN": str(max(4096, args.prompt_tokens + 64)),
        "BATON_NUM_KV_BLOCKS": str(args.num_kv_blocks),
    }
    return replace(up.cluster_spec(), env=env)


async def one(
    session: aiohttp.ClientSession, api: str, prompt: list[int], engine: str
) -> tuple[float, float]:
    """(TTFT, gap to the second token) in seconds, seen by the client."""
    body: dict[str, object] = {
        "model": "baton-sim",
        "prompt": prompt,
        "max_tokens": 4,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
    }
    if engine != "sim":
        body["logprobs"] = 0  # an event per token, even one with no text
    started = time.perf_counter()
    arrivals: list[float] = []
    async with session.post(f"{api}/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if line.startswith(b"data: {") and (
                b'"text":""' not in line or b'"token_logprobs"' in line
            ):
                arrivals.append(time.perf_counter())
    if len(arrivals) < 2:
        raise RuntimeError(f"{len(arrivals)} token events seen; at least 2 were expected")
    return arrivals[0] - started, arrivals[1] - arrivals[0]


def phase_means(metrics: str) -> dict[str, float]:
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for line in metrics.splitlines():
        for phase in PHASES:
            label = f'phase="{phase}"'
            if label not in line:
                continue
            if line.startswith("baton_frontend_ttft_phase_seconds_sum"):
                sums[phase] = float(line.split()[-1])
            elif line.startswith("baton_frontend_ttft_phase_seconds_count"):
                counts[phase] = float(line.split()[-1])
    return {p: sums[p] / counts[p] for p in PHASES if counts.get(p)}


async def measure(args: argparse.Namespace, url: str) -> dict[str, object]:
    rng = random.Random(args.seed)
    api = f"{url}/v1"
    ttfts, gaps = [], []
    async with aiohttp.ClientSession() as session:
        await one(session, api, [rng.randrange(10, 6000) for _ in range(16)], args.engine)
        async with session.get(f"{url}/metrics") as resp:
            warm = phase_means(await resp.text())
        for _ in range(args.requests):
            prompt = [rng.randrange(10, 6000) for _ in range(args.prompt_tokens)]
            ttft, gap = await one(session, api, prompt, args.engine)
            ttfts.append(ttft)
            gaps.append(gap)
        async with session.get(f"{url}/metrics") as resp:
            text = await resp.text()
    remote = [
        ln for ln in text.splitlines() if ln.startswith("baton_frontend_remote_prefills_total")
    ]
    return {
        "phase_mean_ms_including_warmup": {k: v * 1000 for k, v in phase_means(text).items()},
        "warmup_phase_ms": {k: v * 1000 for k, v in warm.items()},
        "client_ttft_ms_p50": statistics.median(ttfts) * 1000,
        "client_ttft_ms_max": max(ttfts) * 1000,
        "first_decode_step_ms_p50": statistics.median(gaps) * 1000,
        "remote_prefills": float(remote[0].split()[-1]) if remote else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default="torch", choices=["sim", "torch", "vllm"])
    parser.add_argument("--kv-transfer", default="auto", choices=["auto", "shm", "tcp", "nixl"])
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--num-kv-blocks", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    log_dir = tempfile.mkdtemp(prefix="baton-ttft-")
    with cluster_in_thread(cluster_spec(args, log_dir)) as cluster:
        result = asyncio.run(measure(args, cluster.url))
    phases = result["phase_mean_ms_including_warmup"]
    assert isinstance(phases, dict)
    print(
        f"TTFT breakdown: {args.engine} engine, {args.kv_transfer} transport, "
        f"{args.requests} prompts of {args.prompt_tokens} tokens, one at a time"
    )
    for phase in PHASES:
        print(f"  {phase:<22} {phases.get(phase, float('nan')):9.2f} ms (mean)")
    print(f"  {'client TTFT p50':<22} {result['client_ttft_ms_p50']:9.2f} ms")
    print(f"  {'first decode step p50':<22} {result['first_decode_step_ms_p50']:9.2f} ms")
    print(f"  {'remote prefills':<22} {result['remote_prefills']:9.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), **result}, indent=2))


if __name__ == "__main__":
    main()
