"""Worker ids as bit positions: the index's compact names for workers (pure).

``KVIndex`` stores, per block, an int whose bit ``slot + 1`` says the worker in ``slot``
holds it (bit 0 is the index's own flag). ``WorkerSlots`` hands those slots out, the lowest
free one first so that values stay narrow, and counts the entries carrying each slot's bit.
A dropped worker's slot is *retired*: its bit no longer names anyone, but blocks may still
carry it until the index reclaims them, so it is only reused once its count reaches zero.
"""

from collections.abc import Iterable, Iterator
from heapq import heappop, heappush
from typing import Final

from proto.messages import InstanceId

_CACHE_SIZE: Final = 64  # candidate tuples remembered (pools, roles, filters)
FREE: Final = InstanceId("")  # the worker of a slot nobody holds (ids are never empty)


def bit_of(slot: int) -> int:
    """The value bit of ``slot`` (bit 0 is reserved for the index)."""
    return 2 << slot


def slots_in(bits: int) -> Iterator[int]:
    """The slots whose bits are set in ``bits``, lowest first."""
    while bits:
        low = bits & -bits
        yield low.bit_length() - 2
        bits ^= low


class WorkerSlots:
    """Slot allocation, retirement and per-slot entry counts for one index."""

    def __init__(self) -> None:
        self.slot_of: dict[InstanceId, int] = {}
        self.worker_of_slot: list[InstanceId] = []  # FREE for a retired or free slot
        self.num_entries: list[int] = []  # entries carrying each slot's bit, live or retired
        self.live_bits = 0
        self.retired_bits = 0
        self._free: list[int] = []  # heap
        self._cache: dict[tuple[InstanceId, ...], int] = {}  # cleared when slots change

    def acquire(self, worker_id: InstanceId) -> int:
        """The worker's slot, allocating the lowest free one if it has none."""
        slot = self.slot_of.get(worker_id)
        if slot is not None:
            return slot
        if self._free:
            slot = heappop(self._free)
            self.worker_of_slot[slot] = worker_id
        else:
            slot = len(self.worker_of_slot)
            self.worker_of_slot.append(worker_id)
            self.num_entries.append(0)
        self.slot_of[worker_id] = slot
        self.live_bits |= bit_of(slot)
        self._cache.clear()
        return slot

    def retire(self, worker_id: InstanceId) -> bool:
        """Stop the worker's bit naming it (False if it had no slot). The slot is freed now
        if no entry carries it, else once ``drop`` has cleared the last one."""
        slot = self.slot_of.pop(worker_id, None)
        if slot is None:
            return False
        bit = bit_of(slot)
        self.live_bits &= ~bit
        self.worker_of_slot[slot] = FREE
        self._cache.clear()
        self.retired_bits |= bit
        if not self.num_entries[slot]:
            self._release(slot)
        return True

    def drop(self, bits: int) -> int:
        """Account for clearing ``bits`` from one block; returns how many entries that was."""
        num_entries = self.num_entries
        num_dropped = 0
        for slot in slots_in(bits):
            num_entries[slot] -= 1
            if not num_entries[slot] and self.retired_bits & bit_of(slot):
                self._release(slot)
            num_dropped += 1
        return num_dropped

    def candidate_bits(self, candidates: Iterable[InstanceId]) -> int:
        """The bits of the candidates that have slots, cached per candidate tuple (building
        it costs a lookup per worker; hashing the tuple is one C call)."""
        key = tuple(candidates)
        bits = self._cache.get(key)
        if bits is None:
            slot_of = self.slot_of
            bits = 0
            for worker_id in key:
                slot = slot_of.get(worker_id)
                if slot is not None:
                    bits |= bit_of(slot)
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = bits
        return bits

    @property
    def num_retired_slots(self) -> int:
        return self.retired_bits.bit_count()

    @property
    def num_retired_entries(self) -> int:
        return sum(self.num_entries[slot] for slot in slots_in(self.retired_bits))

    @property
    def num_live_entries(self) -> int:
        return sum(self.num_entries[slot] for slot in self.slot_of.values())

    def clear(self) -> None:
        """Forget every slot; only valid once no block carries any bit."""
        self.slot_of.clear()
        self.worker_of_slot.clear()
        self.num_entries.clear()
        self._free.clear()
        self._cache.clear()
        self.live_bits = 0
        self.retired_bits = 0

    def _release(self, slot: int) -> None:
        self.retired_bits &= ~bit_of(slot)
        heappush(self._free, slot)
