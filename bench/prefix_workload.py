"""Prefix-sharing workload, simulation only: a Mooncake trace through simulated workers.

It replays ``/work/shared/traces/mooncake_conversation_trace.jsonl`` (one ``hash_ids`` entry
per 512-token block; equal ids mean a shared prefix) through a discrete-event model of a
small cluster, once per routing mode, with the real ``shared.routing.router.Router`` making
every decision from the workers' ``KVEventBatch`` and ``LoadMetrics`` messages.

Scaling. Each hash id becomes one 16-token block (hashed as a chain with
``hash_block_tokens``, as a worker would), output lengths are divided by the same factor
(``--output-scale`` 32, at least one token), and trace time is divided by each of
``--speedups`` (default 30, 60, 120): the knob that sets how loaded the cluster is. The
trace's timestamps are whole seconds, so requests arrive in bursts of up to ~20.

The worker model follows Baton's simulated engine (``shared.engine``): its step times come
from the engine's own ``TimingModel`` (defaults: a ~1B model on one GPU), and its scheduler
rules are the engine's: every step decodes all running requests and admits waiting ones
first come first served while ``--max-num-batched-tokens``, ``--max-num-seqs`` and free
blocks allow; a prompt is prefilled whole in one step, its longest cached prefix reused
(at least one token is recomputed); the first token comes at the end of that step. KV lives
in ``--num-kv-blocks`` blocks: blocks held by running requests are in use, finished
requests' cached blocks stay as an evictable LRU prefix cache, and reusing one emits
``BlockRemoved``, while newly computed prompt blocks emit ``BlockStored``. Output blocks are
reserved at admission (no preemption). Each step's events go out as one batch, delivered
``--event-delay-ms`` later; each worker reports ``LoadMetrics`` every ``--load-interval-ms``.

Reported per load level and mode: prefix-cache hit rate (blocks reused at admission /
prompt blocks), the router's own estimate, TTFT p50/p99/mean (modelled milliseconds), and
the busiest worker's share of requests and of prefill tokens (max / mean over workers).

    .venv/bin/python bench/prefix_workload.py                 # first 2,000 requests
    .venv/bin/python bench/prefix_workload.py --all --json /tmp/prefix.json
"""

import argparse
import heapq
import json
import statistics
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from proto.messages import (
    BlockHash,
    BlockRemoved,
    BlockStored,
    InstanceId,
    KVEvent,
    KVEventBatch,
    LoadMetrics,
)
from shared.engine.timing import TimingModel
from shared.kv_hash import hash_block_tokens
from shared.routing.cost import RoutingMode, RoutingPolicy
from shared.routing.router import Router

TRACE = Path("/work/shared/traces/mooncake_conversation_trace.jsonl")
BLOCK_SIZE = 16


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    num_workers: int = 4
    output_scale: float = 32.0
    num_kv_blocks: int = 8192
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    event_delay_ms: float = 1.0
    load_interval_ms: float = 250.0


@dataclass(frozen=True, slots=True)
class TraceRow:
    timestamp_s: float
    hashes: list[BlockHash]
    num_output_tokens: int


@dataclass(slots=True)
class Request:
    arrival_s: float
    hashes: list[BlockHash]
    num_output_tokens: int
    num_cached_blocks: int = 0
    num_output_left: int = 0
    first_token_s: float = 0.0
    held: list[BlockHash] = field(default_factory=list)  # cached blocks it references
    num_private_blocks: int = 0  # blocks it holds that are not (yet) in the cache


@dataclass(slots=True)
class SimWorker:
    """One engine: scheduler rules and block accounting of ``shared.engine``, modelled time."""

    worker_id: InstanceId
    config: SimConfig
    timing: TimingModel
    refs: dict[BlockHash, int] = field(default_factory=dict)  # cached blocks in use
    evictable: OrderedDict[BlockHash, None] = field(default_factory=OrderedDict)  # LRU first
    num_private_blocks: int = 0
    waiting: deque[Request] = field(default_factory=deque)
    running: list[Request] = field(default_factory=list)
    prefilling: list[Request] = field(default_factory=list)
    seq: int = 0
    events: list[KVEvent] = field(default_factory=list)
    is_busy: bool = False
    num_requests: int = 0
    num_prefill_tokens: int = 0

    @property
    def num_used_blocks(self) -> int:
        return len(self.refs) + self.num_private_blocks

    def start_step(self) -> float:
        """Plan a step (decode all, admit FCFS); returns its duration in seconds."""
        config = self.config
        budget = config.max_num_batched_tokens
        new_token_counts: list[int] = []
        while self.waiting and len(self.running) + len(self.prefilling) < config.max_num_seqs:
            request = self.waiting[0]
            hashes = request.hashes
            matched = 0
            for block_hash in hashes[: len(hashes) - 1]:  # one token is always recomputed
                if block_hash not in self.refs and block_hash not in self.evictable:
                    break
                matched += 1
            num_new_tokens = (len(hashes) - matched) * BLOCK_SIZE
            if num_new_tokens > budget and new_token_counts:
                break
            num_private = len(hashes) - matched + -(-request.num_output_tokens // BLOCK_SIZE)
            revived = sum(1 for h in hashes[:matched] if h in self.evictable)
            if num_private + revived > config.num_kv_blocks - self.num_used_blocks:
                break
            self.waiting.popleft()
            for block_hash in hashes[:matched]:
                if block_hash in self.evictable:
                    del self.evictable[block_hash]
                    self.refs[block_hash] = 1
                else:
                    self.refs[block_hash] += 1
            self.reclaim(num_private)
            self.num_private_blocks += num_private
            request.num_cached_blocks = matched
            request.held = hashes[:matched]
            request.num_private_blocks = num_private
            new_token_counts.append(num_new_tokens)
            budget -= num_new_tokens
            self.prefilling.append(request)
        self.num_prefill_tokens += sum(new_token_counts)
        kv_usage = self.num_used_blocks / config.num_kv_blocks
        return self.timing.step_ms(new_token_counts, len(self.running), kv_usage) / 1000

    def reclaim(self, num_blocks: int) -> None:
        """Make ``num_blocks`` plain free blocks, reusing the oldest evictable ones."""
        num_plain_free = self.config.num_kv_blocks - self.num_used_blocks - len(self.evictable)
        evicted = []
        for _ in range(num_blocks - num_plain_free):
            evicted.append(self.evictable.popitem(last=False)[0])
        if evicted:
            self.events.append(BlockRemoved(block_hashes=evicted))

    def finish_step(self, now_s: float) -> int:
        """Tokens for the step that ended; returns how many requests finished."""
        still_running = []
        for request in self.running:
            request.num_output_left -= 1
            if request.num_output_left > 0:
                still_running.append(request)
            else:
                self.release(request)
        num_finished = len(self.running) - len(still_running)
        for request in self.prefilling:
            request.first_token_s = now_s
            request.num_output_left = request.num_output_tokens - 1
            self.cache_prompt(request)
            if request.num_output_left > 0:
                still_running.append(request)
            else:
                self.release(request)
                num_finished += 1
        self.running = still_running
        self.prefilling = []
        return num_finished

    def cache_prompt(self, request: Request) -> None:
        """The computed prompt blocks enter the cache (a block cached meanwhile stays private)."""
        stored = []
        for block_hash in request.hashes[request.num_cached_blocks :]:
            if block_hash in self.refs or block_hash in self.evictable:
                continue
            self.refs[block_hash] = 1
            request.held.append(block_hash)
            request.num_private_blocks -= 1
            self.num_private_blocks -= 1
            stored.append(block_hash)
        if stored:
            self.events.append(BlockStored(block_hashes=stored))

    def release(self, request: Request) -> None:
        """Free a finished request's blocks; cached ones become evictable, leaf first."""
        for block_hash in reversed(request.held):
            count = self.refs[block_hash] - 1
            if count:
                self.refs[block_hash] = count
            else:
                del self.refs[block_hash]
                self.evictable[block_hash] = None
        self.num_private_blocks -= request.num_private_blocks

    def take_batch(self) -> KVEventBatch | None:
        if not self.events:
            return None
        self.seq += 1
        batch = KVEventBatch(worker_id=self.worker_id, seq=self.seq, events=self.events)
        self.events = []
        return batch

    def load(self) -> LoadMetrics:
        total = self.config.num_kv_blocks
        used = self.num_used_blocks
        return LoadMetrics(
            worker_id=self.worker_id,
            num_running=len(self.running) + len(self.prefilling),
            num_waiting=len(self.waiting),
            num_free_blocks=total - used,
            num_total_blocks=total,
            kv_usage=used / total,
        )


@dataclass
class ModeResult:
    mode: str
    speedup: float
    num_requests: int
    hit_rate: float
    router_hit_rate: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    ttft_mean_ms: float
    max_request_share: float  # busiest worker's requests / mean
    max_prefill_share: float  # busiest worker's prefill tokens / mean
    requests_per_worker: list[int]
    num_overloaded_decisions: int
    wall_s: float


def load_trace(limit: int | None, output_scale: float) -> list[TraceRow]:
    """The first ``limit`` requests (all if None), prompts hashed as chains of blocks."""
    rows: list[TraceRow] = []
    with TRACE.open() as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            row = json.loads(line)
            hashes: list[BlockHash] = []
            parent: BlockHash | None = None
            for hash_id in row["hash_ids"]:
                parent = hash_block_tokens(parent, [hash_id])
                hashes.append(parent)
            num_output_tokens = max(1, round(row["output_length"] / output_scale))
            rows.append(TraceRow(row["timestamp"] / 1000, hashes, num_output_tokens))
    return rows


ARRIVE, STEP_END, KV_BATCH, LOAD = range(4)


def simulate(
    trace: list[TraceRow], policy: RoutingPolicy, config: SimConfig, speedup: float
) -> ModeResult:
    """Replay ``trace`` with arrivals ``speedup`` times faster through one routing policy."""
    started = time.perf_counter()
    requests = [Request(r.timestamp_s / speedup, r.hashes, r.num_output_tokens) for r in trace]
    timing = TimingModel()
    workers = [SimWorker(InstanceId(f"w{i}"), config, timing) for i in range(config.num_workers)]
    load_interval_s = config.load_interval_ms / 1000
    event_delay_s = config.event_delay_ms / 1000
    index_of = {w.worker_id: i for i, w in enumerate(workers)}
    candidates = [w.worker_id for w in workers]
    router = Router(policy, seed=0)
    heap: list[tuple[float, int, int, Any]] = []
    tick = 0

    def push(at_s: float, kind: int, payload: Any) -> None:
        nonlocal tick
        tick += 1
        heapq.heappush(heap, (at_s, tick, kind, payload))

    def start(worker: int, now_s: float) -> None:
        workers[worker].is_busy = True
        push(now_s + workers[worker].start_step(), STEP_END, worker)

    for request in requests:
        push(request.arrival_s, ARRIVE, request)
    for i in range(config.num_workers):
        push(load_interval_s * (i + 1) / config.num_workers, LOAD, i)
    num_done = 0
    while heap and num_done < len(requests):
        now_s, _, kind, payload = heapq.heappop(heap)
        if kind == ARRIVE:
            decision = router.route(payload.hashes, candidates)
            worker = index_of[decision.worker_id]
            workers[worker].waiting.append(payload)
            workers[worker].num_requests += 1
            if not workers[worker].is_busy:
                start(worker, now_s)
        elif kind == STEP_END:
            sim = workers[payload]
            num_done += sim.finish_step(now_s)
            batch = sim.take_batch()
            if batch is not None:
                push(now_s + event_delay_s, KV_BATCH, batch)
            if sim.running or sim.waiting:
                start(payload, now_s)
            else:
                sim.is_busy = False
        elif kind == KV_BATCH:
            result = router.apply(payload.worker_id, payload)
            assert not result.needs_resync, result
        else:
            router.update_load(workers[payload].load())
            push(now_s + load_interval_s, LOAD, payload)

    ttfts_ms = sorted((r.first_token_s - r.arrival_s) * 1000 for r in requests)
    per_worker = [w.num_requests for w in workers]
    prefilled = [w.num_prefill_tokens for w in workers]
    num_blocks = sum(len(r.hashes) for r in requests)
    return ModeResult(
        mode=str(policy.mode),
        speedup=speedup,
        num_requests=len(requests),
        hit_rate=sum(r.num_cached_blocks for r in requests) / num_blocks,
        router_hit_rate=router.stats.hit_rate,
        ttft_p50_ms=statistics.median(ttfts_ms),
        ttft_p99_ms=ttfts_ms[min(len(ttfts_ms) - 1, int(0.99 * len(ttfts_ms)))],
        ttft_mean_ms=statistics.fmean(ttfts_ms),
        max_request_share=max(per_worker) / statistics.fmean(per_worker),
        max_prefill_share=max(prefilled) / statistics.fmean(prefilled),
        requests_per_worker=per_worker,
        num_overloaded_decisions=router.stats.num_overloaded_decisions,
        wall_s=time.perf_counter() - started,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2_000, help="first N requests")
    parser.add_argument("--all", action="store_true", help="the whole trace (12,031)")
    parser.add_argument("--modes", nargs="+", default=[m.value for m in RoutingMode])
    parser.add_argument(
        "--speedups", type=float, nargs="+", default=[30.0, 60.0, 120.0], help="load levels"
    )
    policy_defaults = RoutingPolicy()
    parser.add_argument("--prefill-weight", type=float, default=policy_defaults.prefill_weight)
    parser.add_argument("--decode-weight", type=float, default=policy_defaults.decode_weight)
    parser.add_argument("--max-kv-usage", type=float, default=policy_defaults.max_kv_usage)
    parser.add_argument("--max-num-waiting", type=int, default=policy_defaults.max_num_waiting)
    parser.add_argument("--temperature", type=float, default=policy_defaults.temperature)
    defaults = SimConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()

    config = SimConfig(**{name: getattr(args, name) for name in asdict(defaults)})
    trace = load_trace(None if args.all else args.requests, config.output_scale)
    results = []
    for speedup in args.speedups:
        for mode in args.modes:
            policy = RoutingPolicy(
                mode=RoutingMode(mode),
                prefill_weight=args.prefill_weight,
                decode_weight=args.decode_weight,
                max_kv_usage=args.max_kv_usage,
                max_num_waiting=args.max_num_waiting,
                temperature=args.temperature,
            )
            results.append(simulate(trace, policy, config, speedup))
    print_table(results, len(trace), config, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "num_requests": len(trace),
                    "config": asdict(config),
                    "policy": {
                        "prefill_weight": args.prefill_weight,
                        "decode_weight": args.decode_weight,
                        "max_kv_usage": args.max_kv_usage,
                        "max_num_waiting": args.max_num_waiting,
                        "temperature": args.temperature,
                    },
                    "results": [asdict(r) for r in results],
                },
                f,
                indent=2,
            )


def print_table(
    results: list[ModeResult], num_requests: int, config: SimConfig, args: argparse.Namespace
) -> None:
    print(
        f"{num_requests} requests, {config.num_workers} workers, "
        f"weights prefill={args.prefill_weight:g} decode={args.decode_weight:g}"
    )
    header = (
        f"{'speedup':>7} {'mode':<13} {'hit':>6} {'est.hit':>7} {'TTFT p50':>9} {'p99':>8} "
        f"{'mean':>8} {'max/mean req':>12} {'max/mean prefill':>16} {'overloaded':>10} "
        f"{'wall s':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.speedup:>7g} {r.mode:<13} {r.hit_rate:>6.3f} {r.router_hit_rate:>7.3f} "
            f"{r.ttft_p50_ms:>9.1f} {r.ttft_p99_ms:>8.1f} {r.ttft_mean_ms:>8.1f} "
            f"{r.max_request_share:>12.2f} {r.max_prefill_share:>16.2f} "
            f"{r.num_overloaded_decisions:>10} {r.wall_s:>6.1f}"
        )
    print("TTFT in modelled milliseconds; hit = blocks reused / prompt blocks")
    by_key = {(r.speedup, r.mode): r for r in results}
    for speedup in dict.fromkeys(r.speedup for r in results):
        kv, rr = by_key.get((speedup, "kv")), by_key.get((speedup, "round_robin"))
        if kv is not None and rr is not None:
            print(
                f"speedup {speedup:g}: kv vs round_robin TTFT p50 "
                f"{kv.ttft_p50_ms / rr.ttft_p50_ms - 1:+.0%}, p99 "
                f"{kv.ttft_p99_ms / rr.ttft_p99_ms - 1:+.0%}, mean "
                f"{kv.ttft_mean_ms / rr.ttft_mean_ms - 1:+.0%}; kv busiest worker "
                f"{kv.max_request_share:.2f}x mean"
            )


if __name__ == "__main__":
    main()
