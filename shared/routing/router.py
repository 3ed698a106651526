"""The router's state and its one question, "where should this prompt go?" (pure, sync).

``Router`` owns a ``KVIndex`` (fed by every worker's ``KVEventBatch``), each worker's
``WorkerLoad`` (fed by ``LoadMetrics`` and by its own decisions) and the hit-rate counters.
The NATS service that wraps it calls, all from one event loop:

- ``apply(worker_id, batch)`` for each ``KVEventBatch``; when the result says
  ``needs_resync`` (a gap or a restart), fetch the worker's cached hashes together with the
  seq of its last batch and call ``resync`` (one fetch in flight per worker is enough).
- ``update_load(metrics)`` for each ``LoadMetrics``.
- ``remove_worker(worker_id)`` when the worker's etcd key (lease) disappears.
- ``route(block_hashes, candidates)`` per request, with ``hash_prompt_blocks`` of the
  prompt and the ids of the live, non-draining workers of the pool that should serve it.
  It counts the decision (``stats``) and the request as pending load on the chosen worker
  unless ``record=False``: then ``commit`` the decision once it is taken, or drop it. The
  pending prefill ends when that worker's BlockStored of the prompt's last block arrives; the
  rest at its next report.

Disaggregation: one ``Router`` serves both pools. The index is keyed by worker, so asking
with the prefill pool's ids as candidates and then with the decode pool's ids gives two
independent answers from one copy of the events; ``policy=`` lets each pool weigh cache
against load differently. The decode decision's ``overlap_blocks`` is the decode worker's
cached prefix: if it covers most of the prompt, prefill there and skip the remote prefill
(``placement.place`` makes that call).

Replicas that applied the same events (each worker's batches in order, interleaved across
workers in any way) hold the same content, and replicas in the same state given the same
calls make the same decisions: ties break by worker id and a decision counter, sampling
uses a seeded RNG. Which blocks an over-full index evicts depends on arrival order, so under
memory pressure replicas can forget different blocks (an under-estimate, never a false hit).
"""

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from proto.messages import BlockHash, BlockStored, InstanceId, KVEventBatch, LoadMetrics
from shared.errors import Unavailable
from shared.routing.cost import (
    Decision,
    RoutingMode,
    RoutingPolicy,
    WorkerLoad,
    base_cost,
    choose_worker,
    worker_cost,
)
from shared.routing.index import ApplyResult, ApplyStatus, KVIndex


@dataclass(slots=True)
class RouterStats:
    """Counters for the service's metrics. ``hit_rate`` is the router's estimate (blocks it
    believed cached on the chosen worker / prompt blocks); the engines' ``num_cached_tokens``
    give the real one."""

    num_decisions: int = 0
    num_prompt_blocks: int = 0
    num_overlap_blocks: int = 0
    num_overloaded_decisions: int = 0  # every candidate was over its cap
    num_decisions_by_worker: dict[InstanceId, int] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        """Overlap blocks over prompt blocks, over every decision so far (0.0 before any)."""
        return self.num_overlap_blocks / self.num_prompt_blocks if self.num_prompt_blocks else 0.0


class Router:
    """KV-aware (or baseline) routing over a pool of workers; see the module docstring."""

    def __init__(
        self, policy: RoutingPolicy | None = None, *, max_entries: int = 4_000_000, seed: int = 0
    ) -> None:
        self.policy = policy or RoutingPolicy()
        self.index = KVIndex(max_entries)
        self.stats = RouterStats()
        self._loads: dict[InstanceId, WorkerLoad] = {}
        self._base_costs: dict[InstanceId, float] = {}  # base_cost(load, self.policy)
        self._rng = random.Random(seed)
        self._turn = 0

    # --- inputs ------------------------------------------------------------------------------

    def apply(self, worker_id: InstanceId, batch: KVEventBatch) -> ApplyResult:
        """Replay a worker's KV events (see ``KVIndex.apply`` for seq handling); a stored
        run ending at a pending prompt's last block ends that prompt's pending prefill."""
        result = self.index.apply(worker_id, batch)
        load = self._loads.get(worker_id)
        if (
            load is not None
            and load.pending_prefill_by_hash
            and result.status is not ApplyStatus.DUPLICATE
        ):
            for event in batch.events:
                if isinstance(event, BlockStored) and event.block_hashes:
                    load.note_stored(event.block_hashes[-1])
            self._base_costs[worker_id] = base_cost(load, self.policy)
        return result

    def resync(self, worker_id: InstanceId, block_hashes: Iterable[BlockHash], seq: int) -> None:
        """Replace a worker's blocks with its own snapshot, taken as of batch ``seq``."""
        self.index.resync(worker_id, block_hashes, seq)

    def update_load(self, metrics: LoadMetrics) -> None:
        """Take a worker's fresh load report (clears its pending estimate)."""
        load = self._load(metrics.worker_id)
        load.update(metrics)
        self._base_costs[metrics.worker_id] = base_cost(load, self.policy)

    def note_routed(
        self,
        worker_id: InstanceId,
        num_blocks: int,
        num_new_blocks: int | None = None,
        last_block_hash: BlockHash | None = None,
    ) -> None:
        """Count a request of ``num_blocks`` blocks (``num_new_blocks`` uncached; default
        all) sent to ``worker_id`` until its next report; its prefill part ends earlier,
        when the worker stores ``last_block_hash`` (the prompt's last full block). ``route``
        does this itself unless called with ``record=False``."""
        load = self._load(worker_id)
        load.note_routed(num_blocks, num_new_blocks, last_block_hash)
        self._base_costs[worker_id] = base_cost(load, self.policy)

    def _load(self, worker_id: InstanceId) -> WorkerLoad:
        load = self._loads.get(worker_id)
        if load is None:
            load = self._loads[worker_id] = WorkerLoad()
        return load

    def remove_worker(self, worker_id: InstanceId) -> None:
        """Forget a worker whose lease is gone: its blocks, load and counters."""
        self.index.remove_worker(worker_id)
        self._loads.pop(worker_id, None)
        self._base_costs.pop(worker_id, None)
        self.stats.num_decisions_by_worker.pop(worker_id, None)

    def load_of(self, worker_id: InstanceId) -> WorkerLoad | None:
        """The router's view of a worker's load, None before any report or decision.
        Read-only: the router keeps a cost derived from it."""
        return self._loads.get(worker_id)

    # --- the decision ------------------------------------------------------------------------

    def route(
        self,
        block_hashes: Sequence[BlockHash],
        candidates: Sequence[InstanceId],
        *,
        policy: RoutingPolicy | None = None,
        record: bool = True,
    ) -> Decision:
        """Choose one of ``candidates`` for a prompt whose chained block hashes are given.

        Raises ``Unavailable`` when ``candidates`` is empty. Every mode reports the chosen
        worker's cached prefix in ``overlap_blocks`` and counts its matched blocks as used.
        """
        if not candidates:
            raise Unavailable("no worker to route to")
        policy = policy or self.policy
        num_blocks = len(block_hashes)
        overlaps = self.index.overlaps(block_hashes, candidates)
        turn = self._turn
        self._turn += 1
        mode = policy.mode
        base_costs = self._base_costs if _same_load_terms(policy, self.policy) else None
        if mode is RoutingMode.KV:
            decision = choose_worker(
                candidates,
                overlaps,
                num_blocks,
                self._loads,
                policy,
                turn=turn,
                rng=self._rng,
                base_costs=base_costs,
            )
        elif mode is RoutingMode.LEAST_LOADED:
            decision = choose_worker(
                candidates,
                {},
                num_blocks,
                self._loads,
                policy,
                turn=turn,
                rng=self._rng,
                base_costs=base_costs,
            )
            decision = replace(decision, overlap_blocks=overlaps.get(decision.worker_id, 0))
        else:
            decision = self._pick_baseline(candidates, overlaps, num_blocks, policy, turn)
        if record:
            self.commit(decision, block_hashes)
        return decision

    def commit(
        self,
        decision: Decision,
        block_hashes: Sequence[BlockHash],
        num_new_blocks: int | None = None,
    ) -> None:
        """Take a decision ``route`` made with ``record=False``: count it in ``stats`` and its
        request as pending load on its worker, ``num_new_blocks`` of the prompt's blocks to
        compute there (default: those it does not cache)."""
        num_blocks = len(block_hashes)
        self._record(decision, num_blocks)
        if num_blocks:
            if num_new_blocks is None:
                num_new_blocks = num_blocks - decision.overlap_blocks
            self.note_routed(decision.worker_id, num_blocks, num_new_blocks, block_hashes[-1])

    def _pick_baseline(
        self,
        candidates: Sequence[InstanceId],
        overlaps: dict[InstanceId, int],
        num_blocks: int,
        policy: RoutingPolicy,
        turn: int,
    ) -> Decision:
        loads = self._loads
        eligible = [w for w in candidates if not (w in loads and loads[w].is_draining)]
        pool = eligible or list(candidates)
        if policy.mode is RoutingMode.ROUND_ROBIN:
            worker_id = pool[turn % len(pool)]
        else:
            worker_id = self._rng.choice(pool)
        overlap = overlaps.get(worker_id, 0)
        load = loads.get(worker_id) or WorkerLoad()
        return Decision(
            worker_id=worker_id,
            overlap_blocks=overlap,
            cost=worker_cost(load, overlap, num_blocks, policy),
            mode=policy.mode,
            num_prompt_blocks=num_blocks,
            is_overloaded=not eligible,
        )

    def _record(self, decision: Decision, num_blocks: int) -> None:
        stats = self.stats
        stats.num_decisions += 1
        stats.num_prompt_blocks += num_blocks
        stats.num_overlap_blocks += decision.overlap_blocks
        if decision.is_overloaded:
            stats.num_overloaded_decisions += 1
        by_worker = stats.num_decisions_by_worker
        by_worker[decision.worker_id] = by_worker.get(decision.worker_id, 0) + 1


def _same_load_terms(a: RoutingPolicy, b: RoutingPolicy) -> bool:
    """Whether base costs kept for ``b`` are valid for ``a`` (mode and temperature aside)."""
    return a is b or (
        a.prefill_weight == b.prefill_weight
        and a.decode_weight == b.decode_weight
        and a.max_kv_usage == b.max_kv_usage
        and a.max_num_waiting == b.max_num_waiting
    )
