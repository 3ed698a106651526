"""Which worker caches which KV block: replayed from KV events, bounded, pure.

Layout. One dict maps each ``BlockHash`` to an int: bit 0 is a *referenced* flag and bit
``slot + 1`` says that the worker in that slot holds the block. Worker ids map to small slot
numbers, so a block held by any subset of up to 63 workers is one machine word (wider sets
are still one int, just a longer one). Block hashes chain (``shared.kv_hash``), so a hash
names a whole prefix; a prompt's overlap with a worker is the number of leading prompt blocks
that worker holds, and the walk stops at the first block no candidate holds.

Bounded memory. ``max_entries`` caps the (block, worker) entries. When a store pushes past
it, whole blocks are evicted by CLOCK (second chance), the usual approximation of LRU: the
dict keeps insertion order, a store or a match sets the referenced bit, and the eviction hand
walks from the oldest end, giving referenced blocks one more round (moved to the back, bit
cleared) and evicting the rest. A touch costs one write to a dict entry already in cache
instead of relinking a list, which keeps ``overlaps`` cheap (a hot prefix's later touches
cost nothing). Eviction runs in batches down to ``max_entries - max_entries // 64``. An
evicted entry only makes the router under-estimate an overlap, which is safe. Stores insert
a run leaf-first, so a prefix's root outlives its leaves. Size the cap above the cluster's
total KV blocks (sum of ``WorkerInfo.num_kv_blocks``): lossless events never need more, so
eviction is then only a guard against leaks; below it the index forgets prefixes workers
keep but never re-store, until a ``resync``. Measured on CPython 3.11 (``bench/router.py``):
100-120 bytes per block (dict slot, 64-bit key object, value), 70-82 per entry at 16-64
workers with shared prefixes.

Dropping a worker is O(1). ``remove_worker``, ``AllBlocksCleared`` and ``resync`` *retire*
the worker's slot: its bit stops counting at once (no query sees it), and its entries are
reclaimed lazily by eviction or by ``compact`` (run automatically once retired entries are
half of all entries, or retired slots outnumber live ones), so a worker leaving never walks
a million-block dict on the event loop. A slot is reused only once no block carries its bit.

Ordering. Each worker numbers its ``KVEventBatch``es from ``FIRST_SEQ``. ``apply`` expects
``seq`` to grow by one per worker; a jump means lost batches, a return to ``FIRST_SEQ`` means
the worker restarted, and either asks the caller to ``resync`` the worker from its own state.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from itertools import islice
from typing import Final

from proto.messages import AllBlocksCleared, BlockHash, BlockStored, InstanceId, KVEventBatch
from shared.routing.slots import WorkerSlots, bit_of

FIRST_SEQ: Final = 1  # a worker's first KVEventBatch; its state before it is empty
_REF: Final = 1  # bit 0: stored again or matched since the eviction hand last passed
_EVICT_CHUNK: Final = 512  # blocks taken from the oldest end per eviction step


class ApplyStatus(IntEnum):
    """What ``KVIndex.apply`` did with a batch."""

    APPLIED = 1  # the next seq: applied
    DUPLICATE = 2  # a seq already applied: ignored
    GAP = 3  # batches were lost (or the worker is new to us mid-stream): applied, resync
    RESET = 4  # seq restarted at FIRST_SEQ: the worker's blocks dropped, applied, resync


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """The outcome of one batch; ``needs_resync`` tells the caller to fetch the worker's state."""

    status: ApplyStatus
    seq: int
    expected_seq: int | None  # None: the worker was unknown

    @property
    def needs_resync(self) -> bool:
        """True after a gap or a reset: the index may be missing or keeping stale blocks."""
        return self.status in (ApplyStatus.GAP, ApplyStatus.RESET)


@dataclass(slots=True)
class IndexStats:
    """Monotonic counters for metrics."""

    num_batches: int = 0
    num_duplicates: int = 0
    num_gaps: int = 0
    num_resets: int = 0
    num_resyncs: int = 0
    num_evicted_blocks: int = 0
    num_evicted_entries: int = 0
    num_compactions: int = 0


class KVIndex:
    """Block -> workers map with per-worker sequence checks and a cap on entries.

    All methods are synchronous and do no I/O. ``overlaps`` costs one dict lookup per
    prompt block until no candidate is left; ``apply`` costs about one dict operation per
    block in the batch.
    """

    def __init__(self, max_entries: int = 4_000_000) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.stats = IndexStats()
        self._values: dict[BlockHash, int] = {}
        self._slots = WorkerSlots()
        self._num_entries = 0
        self._next_seq: dict[InstanceId, int] = {}

    # --- state -------------------------------------------------------------------------------

    @property
    def num_entries(self) -> int:
        """(block, worker) entries held in memory, retired ones not yet reclaimed included."""
        return self._num_entries

    @property
    def num_live_entries(self) -> int:
        """(block, worker) entries of workers the index still tracks."""
        return self._slots.num_live_entries

    @property
    def num_blocks(self) -> int:
        """Distinct block hashes held in memory."""
        return len(self._values)

    @property
    def worker_ids(self) -> list[InstanceId]:
        """Workers with a slot (they stored blocks since they were last dropped)."""
        return list(self._slots.slot_of)

    def num_blocks_of(self, worker_id: InstanceId) -> int:
        """How many blocks the index believes ``worker_id`` holds (O(1))."""
        slot = self._slots.slot_of.get(worker_id)
        return 0 if slot is None else self._slots.num_entries[slot]

    def expected_seq(self, worker_id: InstanceId) -> int | None:
        """The seq the next batch from ``worker_id`` should carry; None if it is unknown."""
        return self._next_seq.get(worker_id)

    def blocks_of(self, worker_id: InstanceId) -> set[BlockHash]:
        """Every block ``worker_id`` holds. O(blocks): for tests, debugging and snapshots."""
        slot = self._slots.slot_of.get(worker_id)
        if slot is None:
            return set()
        bit = bit_of(slot)
        return {block_hash for block_hash, value in self._values.items() if value & bit}

    def snapshot(self) -> dict[InstanceId, frozenset[BlockHash]]:
        """The logical content, worker by worker, independent of slots and eviction order."""
        return {worker_id: frozenset(self.blocks_of(worker_id)) for worker_id in self.worker_ids}

    # --- queries -----------------------------------------------------------------------------

    def overlaps(
        self, block_hashes: Sequence[BlockHash], candidates: Iterable[InstanceId] | None = None
    ) -> dict[InstanceId, int]:
        """Cached prefix length, in blocks, of each candidate (all workers if None).

        Workers with no matched block are absent. Matched blocks count as used for eviction.
        """
        slots = self._slots
        alive = slots.live_bits if candidates is None else slots.candidate_bits(candidates)
        result: dict[InstanceId, int] = {}
        if not alive:
            return result
        values = self._values
        get = values.get
        depth = 0
        for block_hash in block_hashes:
            value = get(block_hash)
            if value is None:
                break
            held = value & alive
            if held != alive:
                if depth:
                    self._credit(result, alive ^ held, depth)
                alive = held
                if not alive:
                    return result
            if not value & _REF:
                values[block_hash] = value | _REF
            depth += 1
        if depth:
            self._credit(result, alive, depth)
        return result

    def _credit(self, result: dict[InstanceId, int], bits: int, depth: int) -> None:
        """Record ``depth`` for the workers of ``bits`` (live bits only: never FREE)."""
        worker_of_slot = self._slots.worker_of_slot
        while bits:  # inlined: this runs once per worker per decision
            low = bits & -bits
            result[worker_of_slot[low.bit_length() - 2]] = depth
            bits ^= low

    # --- events ------------------------------------------------------------------------------

    def apply(self, worker_id: InstanceId, batch: KVEventBatch) -> ApplyResult:
        """Replay one worker's batch, checking its ``seq`` (see ``ApplyStatus``).

        A gap still applies the batch: its stores and removals are facts, and applying them
        keeps the index closer to the truth until the resync lands. Raises ``ValueError`` if
        the batch names another worker (the subject and the payload disagree).
        """
        if batch.worker_id != worker_id:
            raise ValueError(f"batch from {batch.worker_id!r} arrived as {worker_id!r}")
        stats = self.stats
        stats.num_batches += 1
        seq = batch.seq
        expected = self._next_seq.get(worker_id)
        if expected is None:
            status = ApplyStatus.APPLIED if seq == FIRST_SEQ else ApplyStatus.GAP
        elif seq == expected:
            status = ApplyStatus.APPLIED
        elif seq > expected:
            status = ApplyStatus.GAP
        elif seq == FIRST_SEQ:
            status = ApplyStatus.RESET
            self._retire(worker_id)
        else:
            stats.num_duplicates += 1
            return ApplyResult(ApplyStatus.DUPLICATE, seq, expected)
        if status is ApplyStatus.GAP:
            stats.num_gaps += 1
        elif status is ApplyStatus.RESET:
            stats.num_resets += 1
        self._next_seq[worker_id] = seq + 1
        slots = self._slots
        for event in batch.events:
            if isinstance(event, BlockStored):
                self._store(slots.acquire(worker_id), event.block_hashes)
            elif isinstance(event, AllBlocksCleared):
                self._retire(worker_id)
            else:
                slot = slots.slot_of.get(worker_id)
                if slot is not None:
                    self._remove(slot, event.block_hashes)
        return ApplyResult(status, seq, expected)

    def resync(self, worker_id: InstanceId, block_hashes: Iterable[BlockHash], seq: int) -> None:
        """Replace ``worker_id``'s blocks with its own account of them, as of batch ``seq``.

        The snapshot and ``seq`` must be taken together on the worker (the seq of the last
        batch it published). Later batches then apply in order and older ones are ignored.
        """
        self.stats.num_resyncs += 1
        self._retire(worker_id)
        self._store(self._slots.acquire(worker_id), list(block_hashes))
        self._next_seq[worker_id] = seq + 1

    def remove_worker(self, worker_id: InstanceId) -> None:
        """Forget a worker (its lease is gone): its blocks stop counting at once, O(1)."""
        self._retire(worker_id)
        self._next_seq.pop(worker_id, None)

    def compact(self) -> None:
        """Reclaim every retired entry now: one pass over all blocks (O(blocks))."""
        dead = self._slots.retired_bits
        if not dead:
            return
        self.stats.num_compactions += 1
        values = self._values
        for block_hash in [h for h, value in values.items() if value & dead]:
            value = values[block_hash]
            self._num_entries -= self._slots.drop(value & dead)
            value &= ~dead
            if value > _REF:
                values[block_hash] = value
            else:
                del values[block_hash]

    # --- internals ---------------------------------------------------------------------------

    def _store(self, slot: int, block_hashes: list[BlockHash]) -> None:
        bit = bit_of(slot)
        values = self._values
        get = values.get
        num_added = 0
        for block_hash in reversed(block_hashes):  # leaf first: the root ends up newest
            value = get(block_hash)
            if value is None:
                values[block_hash] = bit
                num_added += 1
            elif not value & bit:
                values[block_hash] = value | bit | _REF
                num_added += 1
            elif not value & _REF:
                values[block_hash] = value | _REF
        self._slots.num_entries[slot] += num_added
        self._num_entries += num_added
        if self._num_entries > self.max_entries:
            self._evict()

    def _remove(self, slot: int, block_hashes: list[BlockHash]) -> None:
        bit = bit_of(slot)
        values = self._values
        get = values.get
        num_removed = 0
        for block_hash in block_hashes:
            value = get(block_hash)
            if value is not None and value & bit:
                value ^= bit
                if value > _REF:
                    values[block_hash] = value
                else:
                    del values[block_hash]
                num_removed += 1
        self._slots.num_entries[slot] -= num_removed
        self._num_entries -= num_removed

    def _evict(self) -> None:
        """CLOCK down to the low-water mark (see the module docstring)."""
        target = self.max_entries - self.max_entries // 64
        values = self._values
        stats = self.stats
        while self._num_entries > target and values:
            for block_hash, value in list(islice(values.items(), _EVICT_CHUNK)):
                del values[block_hash]
                if value & _REF:
                    values[block_hash] = value ^ _REF  # second chance: to the back
                    continue
                num_dropped = self._slots.drop(value & ~_REF)
                self._num_entries -= num_dropped
                stats.num_evicted_blocks += 1
                stats.num_evicted_entries += num_dropped
                if self._num_entries <= target:
                    break

    def _retire(self, worker_id: InstanceId) -> None:
        slots = self._slots
        if not slots.retire(worker_id):
            return
        if not slots.live_bits:  # nobody left: drop everything at C speed
            self._values.clear()
            self._num_entries = 0
            slots.clear()
        elif 2 * slots.num_retired_entries > self._num_entries or slots.num_retired_slots > max(
            16, len(slots.slot_of)
        ):
            self.compact()
