from proto.messages import InstanceId
from shared.routing.slots import WorkerSlots, bit_of, slots_in

A = InstanceId("a")
B = InstanceId("b")
C = InstanceId("c")


def test_acquire_hands_out_the_lowest_free_slot_and_reuses_released_ones():
    slots = WorkerSlots()
    assert [slots.acquire(w) for w in (A, B, A)] == [0, 1, 0]
    assert slots.live_bits == bit_of(0) | bit_of(1) == 0b110

    assert slots.retire(A)  # no entries carry its bit: free at once
    assert not slots.retire(A)
    assert slots.acquire(C) == 0
    assert slots.worker_of_slot == [C, B]


def test_retired_slot_is_reused_only_after_its_last_entry_is_dropped():
    slots = WorkerSlots()
    slot = slots.acquire(A)
    slots.num_entries[slot] = 2
    slots.retire(A)
    assert (slots.retired_bits, slots.num_retired_entries) == (bit_of(slot), 2)
    assert slots.acquire(B) == 1

    assert slots.drop(bit_of(slot) | bit_of(1)) == 2  # one entry of each
    assert slots.retired_bits == bit_of(slot)
    assert slots.drop(bit_of(slot)) == 1
    assert slots.retired_bits == 0
    assert slots.acquire(C) == slot


def test_candidate_bits_skip_unknown_workers_and_follow_slot_changes():
    slots = WorkerSlots()
    slots.acquire(A)
    assert slots.candidate_bits([A, B]) == bit_of(0)
    slots.acquire(B)
    assert slots.candidate_bits([A, B]) == bit_of(0) | bit_of(1)
    slots.retire(A)
    assert slots.candidate_bits([A, B]) == bit_of(1)
    assert list(slots_in(0b1010)) == [0, 2]
