"""Router core benchmark: decision latency and KV-event ingest rate of ``shared.routing``.

For each (workers, cached blocks) pair it builds a synthetic cluster: prompts of 64-256
blocks made of one of 64 shared system prompts (16-64 blocks), half of them extending an
earlier prompt (multi-turn), plus a unique tail. Each prompt goes to a random worker, whose
own LRU cache (``blocks / workers`` entries) stores the uncached suffix and evicts its oldest
blocks, emitting ``BlockStored``/``BlockRemoved`` as a worker would; four requests' events
make one ``KVEventBatch``. Block hashes are random 64-bit ints (hashing is the worker's cost).

Measured, on one core of this machine:

- ingest, block events (hashes stored + removed) per second, applying the batches as
  decoded structs ("apply") and from msgpack bytes with the service's decoder
  ("decode+apply"), for the fill (an empty index growing to the target) and for a steady
  phase at the target (stores and removals balanced);
- ``Router.route`` latency over all workers as candidates, p50/p99/max in microseconds, each
  on a prompt not queried before (cold), with every worker's load reported every 64
  decisions (not timed); ``KVIndex.overlaps`` alone is timed on other fresh prompts. The
  bench's own heap (worker caches, prompt lists) is frozen out of the GC first;
- index memory, bytes per block and per (block, worker) entry, with ``tracemalloc`` while
  building a copy from bytes (``--no-memory`` skips it).

The cap defaults to 4x the target, so nothing is evicted; ``--max-entries`` below the
target measures ingest under CLOCK eviction instead.

Run from the repository root::

    .venv/bin/python bench/router.py
    .venv/bin/python bench/router.py --workers 16 --blocks 100000 --json /tmp/router.json
"""

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
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
from shared.codec import encode, kv_event_batch_decoder
from shared.routing.index import KVIndex
from shared.routing.router import Router

REQUESTS_PER_BATCH = 4


@dataclass
class Row:
    num_workers: int
    target_blocks: int
    max_entries: int
    num_blocks: int
    num_entries: int
    fill_events: int
    fill_apply_events_per_s: float
    fill_decode_apply_events_per_s: float
    steady_events: int
    steady_apply_events_per_s: float
    steady_decode_apply_events_per_s: float
    route_p50_us: float
    route_p99_us: float
    route_max_us: float
    overlaps_p50_us: float
    overlaps_p99_us: float
    mean_overlap_blocks: float
    mean_prompt_blocks: float
    bytes_per_block: float | None
    bytes_per_entry: float | None


class Cluster:
    """Synthetic prompts and per-worker LRU caches that emit KV events as workers would."""

    def __init__(self, num_workers: int, target_blocks: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.worker_ids = [InstanceId(f"worker-{i:03d}") for i in range(num_workers)]
        self.capacity = target_blocks // num_workers
        self.caches: list[OrderedDict[BlockHash, None]] = [OrderedDict() for _ in self.worker_ids]
        self.seqs = [0] * num_workers
        self.pending: list[list[KVEvent]] = [[] for _ in self.worker_ids]
        self.num_pending = [0] * num_workers
        self.systems = [self.fresh(self.rng.randint(16, 64)) for _ in range(64)]
        self.recent: deque[list[BlockHash]] = deque(maxlen=4096)

    def fresh(self, n: int) -> list[BlockHash]:
        bits = self.rng.getrandbits
        return [BlockHash(bits(64)) for _ in range(n)]

    def prompt(self) -> list[BlockHash]:
        """A new request: a system prompt or an earlier prompt, then a unique tail."""
        rng = self.rng
        num_blocks = rng.randint(64, 256)
        if self.recent and rng.random() < 0.5:
            base = rng.choice(self.recent)
        else:
            base = rng.choice(self.systems)
        base = base[: num_blocks - 8]
        prompt = base + self.fresh(num_blocks - len(base))
        self.recent.append(prompt)
        return prompt

    def serve(self, worker: int, prompt: list[BlockHash]) -> KVEventBatch | None:
        """The worker computes ``prompt``: events for it, and a batch every few requests."""
        cache = self.caches[worker]
        matched = 0
        for block_hash in prompt:
            if block_hash not in cache:
                break
            cache.move_to_end(block_hash)
            matched += 1
        new = prompt[matched:]
        events = self.pending[worker]
        if new:
            for block_hash in new:
                cache[block_hash] = None
            events.append(
                BlockStored(block_hashes=new, parent_hash=prompt[matched - 1] if matched else None)
            )
        evicted = []
        while len(cache) > self.capacity:
            evicted.append(cache.popitem(last=False)[0])
        if evicted:
            events.append(BlockRemoved(block_hashes=evicted))
        self.num_pending[worker] += 1
        if self.num_pending[worker] < REQUESTS_PER_BATCH or not events:
            return None
        self.seqs[worker] += 1
        self.pending[worker] = []
        self.num_pending[worker] = 0
        return KVEventBatch(worker_id=self.worker_ids[worker], seq=self.seqs[worker], events=events)

    def batches(self, until_full: bool, num_block_events: int = 0) -> Iterator[KVEventBatch]:
        """Batches until every cache is full (fill) or ``num_block_events`` more (steady)."""
        emitted = 0
        while True:
            worker = self.rng.randrange(len(self.worker_ids))
            batch = self.serve(worker, self.prompt())
            if batch is not None:
                yield batch
                emitted += count_block_events([batch])
            if until_full:
                if all(len(cache) >= self.capacity for cache in self.caches):
                    return
            elif emitted >= num_block_events:
                return


def count_block_events(batches: list[KVEventBatch]) -> int:
    return sum(len(e.block_hashes) for b in batches for e in b.events if hasattr(e, "block_hashes"))


def apply_all(router: Router, batches: list[KVEventBatch]) -> float:
    start = time.perf_counter()
    for batch in batches:
        router.apply(batch.worker_id, batch)
    return time.perf_counter() - start


def decode_apply_all(router: Router, payloads: list[bytes]) -> float:
    decode = kv_event_batch_decoder.decode
    start = time.perf_counter()
    for payload in payloads:
        batch = decode(payload)
        router.apply(batch.worker_id, batch)
    return time.perf_counter() - start


def measure_memory(payloads: list[bytes], max_entries: int) -> tuple[float, float]:
    """Bytes per block and per entry of an index built from bytes (keys included)."""
    gc.collect()
    tracemalloc.start()
    index = KVIndex(max_entries)
    decode = kv_event_batch_decoder.decode
    for payload in payloads:
        batch = decode(payload)
        index.apply(batch.worker_id, batch)
    del batch
    gc.collect()
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return size / index.num_blocks, size / index.num_entries


def report_loads(router: Router, cluster: Cluster) -> None:
    for worker_id in cluster.worker_ids:
        total = cluster.capacity * 2
        active = cluster.rng.randrange(cluster.capacity)
        router.update_load(
            LoadMetrics(
                worker_id=worker_id,
                num_running=active // 100,
                num_waiting=0,
                num_free_blocks=total - active,
                num_total_blocks=total,
                kv_usage=active / total,
            )
        )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(
    num_workers: int,
    target_blocks: int,
    num_decisions: int,
    memory: bool,
    seed: int,
    max_entries: int,
) -> Row:
    cluster = Cluster(num_workers, target_blocks, seed)
    fill = list(cluster.batches(until_full=True))
    steady = list(
        cluster.batches(until_full=False, num_block_events=max(200_000, target_blocks // 4))
    )
    fill_bytes = [encode(b) for b in fill]
    steady_bytes = [encode(b) for b in steady]
    fill_events, steady_events = count_block_events(fill), count_block_events(steady)

    decoded = Router(max_entries=max_entries)
    fill_decode_s = decode_apply_all(decoded, fill_bytes)
    steady_decode_s = decode_apply_all(decoded, steady_bytes)
    del decoded
    gc.collect()
    router = Router(max_entries=max_entries)
    fill_apply_s = apply_all(router, fill)
    steady_apply_s = apply_all(router, steady)

    del fill, steady  # the service keeps no decoded batches around either
    prompts = [cluster.prompt() for _ in range(num_decisions)]
    probes = [cluster.prompt() for _ in range(num_decisions)]  # fresh ones for overlaps alone
    gc.collect()
    gc.freeze()  # the bench's own heap (worker caches, prompts) is no part of a router's
    route_us: list[float] = []
    overlaps_us: list[float] = []
    overlap_blocks = 0
    candidates = cluster.worker_ids
    clock = time.perf_counter_ns
    for i, (prompt, probe) in enumerate(zip(prompts, probes, strict=True)):
        if i % 64 == 0:
            report_loads(router, cluster)
        start = clock()
        decision = router.route(prompt, candidates)
        route_us.append((clock() - start) / 1000)
        overlap_blocks += decision.overlap_blocks
        start = clock()
        router.index.overlaps(probe, candidates)
        overlaps_us.append((clock() - start) / 1000)

    gc.unfreeze()
    bytes_per_block = bytes_per_entry = None
    if memory:
        bytes_per_block, bytes_per_entry = measure_memory(fill_bytes + steady_bytes, max_entries)
    return Row(
        num_workers=num_workers,
        target_blocks=target_blocks,
        max_entries=max_entries,
        num_blocks=router.index.num_blocks,
        num_entries=router.index.num_entries,
        fill_events=fill_events,
        fill_apply_events_per_s=fill_events / fill_apply_s,
        fill_decode_apply_events_per_s=fill_events / fill_decode_s,
        steady_events=steady_events,
        steady_apply_events_per_s=steady_events / steady_apply_s,
        steady_decode_apply_events_per_s=steady_events / steady_decode_s,
        route_p50_us=statistics.median(route_us),
        route_p99_us=percentile(route_us, 0.99),
        route_max_us=max(route_us),
        overlaps_p50_us=statistics.median(overlaps_us),
        overlaps_p99_us=percentile(overlaps_us, 0.99),
        mean_overlap_blocks=overlap_blocks / num_decisions,
        mean_prompt_blocks=sum(map(len, prompts)) / num_decisions,
        bytes_per_block=bytes_per_block,
        bytes_per_entry=bytes_per_entry,
    )


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'workers':>7} {'target':>9} {'blocks':>9} {'entries':>9} | "
        f"{'fill ev/s':>10} {'+decode':>10} {'steady ev/s':>11} {'+decode':>10} | "
        f"{'route p50':>9} {'p99':>7} {'max':>7} {'ovl p50':>7} {'p99':>6} | "
        f"{'hit':>5} {'B/block':>7} {'B/entry':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        memory = (
            f"{r.bytes_per_block:7.0f} {r.bytes_per_entry:7.0f}"
            if r.bytes_per_block is not None and r.bytes_per_entry is not None
            else f"{'-':>7} {'-':>7}"
        )
        print(
            f"{r.num_workers:>7} {r.target_blocks:>9,} {r.num_blocks:>9,} {r.num_entries:>9,} | "
            f"{r.fill_apply_events_per_s:>10,.0f} {r.fill_decode_apply_events_per_s:>10,.0f} "
            f"{r.steady_apply_events_per_s:>11,.0f} {r.steady_decode_apply_events_per_s:>10,.0f} | "
            f"{r.route_p50_us:>9.1f} {r.route_p99_us:>7.1f} {r.route_max_us:>7.0f} "
            f"{r.overlaps_p50_us:>7.1f} {r.overlaps_p99_us:>6.1f} | "
            f"{r.mean_overlap_blocks / r.mean_prompt_blocks:>5.2f} {memory}"
        )
    print("event rates are block events/s (hashes stored + removed); latencies in microseconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--blocks", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-entries",
        type=int,
        default=0,
        help="index cap (default 4x blocks: no eviction); below the blocks it measures eviction",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc pass")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()

    rows = []
    for target_blocks in args.blocks:
        for num_workers in args.workers:
            rows.append(
                run(
                    num_workers,
                    target_blocks,
                    args.decisions,
                    not args.no_memory,
                    args.seed,
                    args.max_entries or 4 * target_blocks,
                )
            )
            print(f"done workers={num_workers} blocks={target_blocks:,}", file=sys.stderr)
    print_table(rows)
    if args.json:
        result: dict[str, Any] = {
            "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg_1m": os.getloadavg()[0],
            "rows": [asdict(r) for r in rows],
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
