"""The routing cost: cached prefix against load, with a hard cap on overload (pure).

For a prompt of ``P`` blocks, a worker that caches its first ``o`` blocks costs

    cost = prefill_weight * (P - o + queued_prefill_blocks)
         + decode_weight * (active_blocks + pending_blocks)

in units of "one block to prefill". The first term estimates how long the request waits for
prefill there: its own uncached blocks plus the uncached blocks of requests routed there
whose prefill the worker has not finished (each ends when the worker's ``BlockStored`` of
that prompt's last full block arrives, or at its next load report). The second is the KV
the worker serves, which slows each of its decode steps: blocks held by running sequences
(from its last ``LoadMetrics``) plus those of requests routed since that report.

Why the pending terms. A report is a snapshot; between two, the requests just sent are
invisible. Counting them stops a burst from piling onto the one worker that caches a shared
system prompt (Dynamo issue #737): each request sent there raises its cost, so it takes a
share bounded by the work its cache saves. Ending the prefill part on the worker's own
BlockStored, not on its next report, matters because reports are staggered: a worker that
just reported would otherwise look empty next to others still charged for prefills they
finished long ago, and draw the next burst.

Why ``decode_weight`` defaults to 0.05. With the engine's ``TimingModel`` defaults, a block
to prefill costs 16 tokens x 0.015 ms = 0.24 ms, while a resident block adds 10 ms / 8192
blocks = 1.2 us to every decode step, and a request of the prefix workload lives through
~10 of them (outputs of ~11 tokens): a resident block is worth ~1/20 of a block to
prefill. ``bench/prefix_workload.py`` agrees: TTFT is flat for 0-0.05 and worsens from 0.2
(at 1.0 the load term drowns the cache). Raise it where decode speed (TPOT) matters more
than time to first token, or outputs are long.

A worker over its load threshold (projected KV usage above ``max_kv_usage``, waiting plus
pending requests above ``max_num_waiting``, or draining) is never chosen while another
candidate is under it, however good its cache; if all are over, the one with the lowest
normalised pressure wins. A cache hit is worth nothing on a worker that cannot start the
request soon (Dynamo issue #7836: decode workers starved while one is swamped).

Ties at ``temperature == 0`` are broken by rotating over the tied workers in id order, so
a cold cluster is served round-robin and replicas given the same inputs agree. With
``temperature > 0`` the choice is sampled with probability proportional to
``exp(-(cost - min_cost) / temperature)`` (temperature in cost units, i.e. blocks).
"""

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import compress

from proto.messages import BlockHash, InstanceId, LoadMetrics


class RoutingMode(StrEnum):
    """How a router picks a worker; only ``KV`` looks at the cache."""

    KV = "kv"  # lowest cost (cached prefix vs load), under the cap
    ROUND_ROBIN = "round_robin"  # next non-draining candidate in turn (a baseline)
    RANDOM = "random"  # a uniformly random non-draining candidate (a baseline)
    LEAST_LOADED = "least_loaded"  # lowest load, under the cap: KV mode blind to the cache


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingPolicy:
    """Weights and thresholds of the cost; one per pool (prefill or decode) if they differ."""

    mode: RoutingMode = RoutingMode.KV
    prefill_weight: float = 1.0  # cost per block to prefill there (the request's or queued)
    decode_weight: float = 0.05  # cost per KV block the worker serves (see module docstring)
    max_kv_usage: float = 0.9  # over it (active + pending / total): only as a last resort
    max_num_waiting: int = 32  # over it (waiting + pending requests): only as a last resort
    temperature: float = 0.0  # 0: argmin; > 0: softmax sampling over -cost / temperature

    def __post_init__(self) -> None:
        if self.prefill_weight < 0 or self.decode_weight < 0:
            raise ValueError(
                f"weights must be >= 0, got prefill_weight={self.prefill_weight} "
                f"decode_weight={self.decode_weight}"
            )
        if not 0 < self.max_kv_usage <= 1:
            raise ValueError(f"max_kv_usage must be in (0, 1], got {self.max_kv_usage}")
        if self.max_num_waiting < 1:
            raise ValueError(f"max_num_waiting must be >= 1, got {self.max_num_waiting}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


@dataclass(slots=True)
class WorkerLoad:
    """A worker's last reported load plus what was routed to it since (the pending part).

    Change it through ``update``, ``note_routed`` and ``note_stored`` only: they keep the
    derived fields (``num_load_blocks``, ``projected_kv_usage``, ``num_queued``) current, so
    that a decision reads a few attributes per candidate instead of recomputing them.
    """

    num_running: int = 0
    num_waiting: int = 0
    num_active_blocks: int = 0  # blocks held by sequences: total minus free
    num_total_blocks: int = 0  # 0: not reported yet
    kv_usage: float = 0.0
    is_draining: bool = False
    num_pending_requests: int = 0
    num_pending_blocks: int = 0  # KV blocks of those requests
    num_pending_prefill_blocks: int = 0  # their uncached blocks: prefill queued there
    predicted_wait_s: float = 0.0  # reported: until a new prompt would be prefilled there
    wait_per_token_s: float = 0.0  # reported: what each queued prompt token adds to that
    num_load_blocks: int = 0  # derived: active + pending blocks
    projected_kv_usage: float = 0.0  # derived: load blocks / total (inf while draining)
    num_queued: int = 0  # derived: waiting + pending requests
    # uncached blocks of each pending prompt, by its last block's hash: the worker's
    # BlockStored of that block says the prefill is done
    pending_prefill_by_hash: dict[BlockHash, int] = field(default_factory=dict)

    def update(self, metrics: LoadMetrics) -> None:
        """Take a fresh report; it counts the requests routed before it, so pending resets."""
        self.num_running = metrics.num_running
        self.num_waiting = metrics.num_waiting
        self.num_active_blocks = metrics.num_total_blocks - metrics.num_free_blocks
        self.num_total_blocks = metrics.num_total_blocks
        self.kv_usage = metrics.kv_usage
        self.is_draining = metrics.is_draining
        self.predicted_wait_s = metrics.predicted_wait_s
        self.wait_per_token_s = metrics.wait_per_token_s
        self.num_pending_requests = 0
        self.num_pending_blocks = 0
        self.num_pending_prefill_blocks = 0
        self.pending_prefill_by_hash.clear()
        self._refresh()

    def note_routed(
        self,
        num_blocks: int,
        num_new_blocks: int | None = None,
        last_block_hash: BlockHash | None = None,
    ) -> None:
        """Count a request of ``num_blocks`` blocks, ``num_new_blocks`` of them uncached
        (default: all), sent here since the last report. Given the prompt's last full
        block's hash, its prefill stops counting once the worker stores that block."""
        num_new = num_blocks if num_new_blocks is None else num_new_blocks
        self.num_pending_requests += 1
        self.num_pending_blocks += num_blocks
        self.num_pending_prefill_blocks += num_new
        if last_block_hash is not None and num_new > 0:
            by_hash = self.pending_prefill_by_hash
            by_hash[last_block_hash] = by_hash.get(last_block_hash, 0) + num_new
        self._refresh()

    def note_stored(self, block_hash: BlockHash) -> None:
        """The worker stored ``block_hash``: a pending prompt ending there is prefilled."""
        num_new = self.pending_prefill_by_hash.pop(block_hash, 0)
        if num_new:
            self.num_pending_prefill_blocks = max(0, self.num_pending_prefill_blocks - num_new)

    def prefill_wait_s(self, block_size: int) -> float:
        """Until a new prompt would start prefilling here: the worker's last prediction
        plus the prompts routed here since, at its measured cost per token."""
        num_pending_tokens = self.num_pending_prefill_blocks * block_size
        return self.predicted_wait_s + num_pending_tokens * self.wait_per_token_s

    def _refresh(self) -> None:
        self.num_load_blocks = self.num_active_blocks + self.num_pending_blocks
        self.num_queued = self.num_waiting + self.num_pending_requests
        if self.is_draining:
            self.projected_kv_usage = math.inf
        elif self.num_total_blocks:
            self.projected_kv_usage = self.num_load_blocks / self.num_total_blocks
        else:
            self.projected_kv_usage = self.kv_usage

    def is_over_cap(self, policy: RoutingPolicy) -> bool:
        """Draining, or projected KV usage or queue above the policy's thresholds."""
        return (
            self.projected_kv_usage > policy.max_kv_usage
            or self.num_queued > policy.max_num_waiting
        )

    def pressure(self, policy: RoutingPolicy) -> float:
        """Load relative to the cap: over 1.0 means over it; draining is infinitely loaded."""
        return max(
            self.projected_kv_usage / policy.max_kv_usage,
            self.num_queued / policy.max_num_waiting,
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes and why. ``overlap_blocks`` is the chosen worker's cached prefix
    as the router believes it (a disaggregated caller compares it with the prompt length to
    decide whether a remote prefill is worth it). ``is_overloaded``: every candidate was over
    its cap; the caller may prefer to shed the request (``Overloaded``)."""

    worker_id: InstanceId
    overlap_blocks: int
    cost: float
    mode: RoutingMode
    num_prompt_blocks: int = 0
    is_overloaded: bool = False


_IDLE = WorkerLoad()  # read-only stand-in for a worker that has not reported yet


def worker_cost(
    load: WorkerLoad, num_overlap_blocks: int, num_prompt_blocks: int, policy: RoutingPolicy
) -> float:
    """The cost of sending the request to one worker (see the module docstring)."""
    num_prefill = num_prompt_blocks - num_overlap_blocks + load.num_pending_prefill_blocks
    return policy.prefill_weight * num_prefill + policy.decode_weight * load.num_load_blocks


def base_cost(load: WorkerLoad, policy: RoutingPolicy) -> float:
    """The load part of a worker's cost (queued prefill and KV), inf when over its cap.

    It changes only when the load does, so a router can keep it per worker and a decision
    then adds the request's own uncached blocks to it.
    """
    if load.projected_kv_usage > policy.max_kv_usage or load.num_queued > policy.max_num_waiting:
        return math.inf
    return (
        policy.prefill_weight * load.num_pending_prefill_blocks
        + policy.decode_weight * load.num_load_blocks
    )


def choose_worker(
    candidates: Sequence[InstanceId],
    overlaps: Mapping[InstanceId, int],
    num_prompt_blocks: int,
    loads: Mapping[InstanceId, WorkerLoad],
    policy: RoutingPolicy,
    *,
    turn: int = 0,
    rng: random.Random | None = None,
    base_costs: Mapping[InstanceId, float] | None = None,
) -> Decision:
    """The lowest-cost candidate under its cap (or the least pressed if none is).

    ``overlaps`` maps workers to cached prefix blocks (absent = 0); ``loads`` maps them to
    their ``WorkerLoad`` (absent = idle). ``base_costs``, if given, must equal
    ``base_cost(loads[w], policy)`` for every loaded worker (a router keeps it current so a
    decision does no per-worker arithmetic). ``turn`` rotates ties (pass a counter); ``rng``
    is required when ``policy.temperature > 0``. Raises ``ValueError`` without candidates.
    """
    if not candidates:
        raise ValueError("no candidates to choose from")
    if base_costs is None:
        base_costs = {w: base_cost(loads[w], policy) for w in candidates if w in loads}
    prefill_weight = policy.prefill_weight
    get_base = base_costs.get
    get_overlap = overlaps.get
    full = prefill_weight * num_prompt_blocks
    costs = {  # the hot loop: one pass, two dict lookups per candidate
        w: get_base(w, 0.0) + full - prefill_weight * get_overlap(w, 0) for w in candidates
    }
    best = min(costs.values())
    is_overloaded = best == math.inf
    if is_overloaded:
        pressures = {w: loads.get(w, _IDLE).pressure(policy) for w in costs}
        worker_id = _pick_min(pressures, turn, min(pressures.values()))
    elif policy.temperature > 0:
        if rng is None:
            raise ValueError("temperature > 0 needs an rng")
        finite = {w: cost for w, cost in costs.items() if cost != math.inf}
        worker_id = _sample(finite, policy.temperature, rng)
    else:
        worker_id = _pick_min(costs, turn, best)
    load = loads.get(worker_id, _IDLE)
    num_overlap_blocks = overlaps.get(worker_id, 0)
    return Decision(
        worker_id=worker_id,
        overlap_blocks=num_overlap_blocks,
        cost=worker_cost(load, num_overlap_blocks, num_prompt_blocks, policy),
        mode=policy.mode,
        num_prompt_blocks=num_prompt_blocks,
        is_overloaded=is_overloaded,
    )


def _pick_min(scores: Mapping[InstanceId, float], turn: int, best: float) -> InstanceId:
    """The worker with score ``best`` (the minimum); ties (to 1e-9 relative) rotate by
    ``turn`` in id order."""
    threshold = best + 1e-9 * max(1.0, abs(best)) if math.isfinite(best) else best
    tied = list(compress(scores, map(threshold.__ge__, scores.values())))  # C-speed filter
    if len(tied) == 1:
        return tied[0]
    tied.sort()
    return tied[turn % len(tied)]


def _sample(
    costs: Mapping[InstanceId, float], temperature: float, rng: random.Random
) -> InstanceId:
    """Softmax over ``-cost / temperature``, candidates in id order so replicas agree."""
    ordered = sorted(costs)
    best = min(costs.values())
    weights = [math.exp(-(costs[worker_id] - best) / temperature) for worker_id in ordered]
    return rng.choices(ordered, weights=weights)[0]
