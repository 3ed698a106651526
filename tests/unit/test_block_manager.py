import hashlib
from array import array

import pytest

from proto.messages import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    RequestId,
    SamplingParams,
)
from shared.engine.block_manager import BlockManager
from shared.engine.sequence import Sequence
from shared.kv_hash import hash_block_tokens


def make_seq(token_ids: list[int], request_id: str = "r0") -> Sequence:
    return Sequence(RequestId(request_id), token_ids, SamplingParams())


def compute(bm: BlockManager, seq: Sequence) -> None:
    """What a step does to the cache: every token so far now has KV."""
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


def chain(*blocks: list[int]) -> list[BlockHash]:
    hashes: list[BlockHash] = []
    parent: BlockHash | None = None
    for block in blocks:
        parent = hash_block_tokens(parent, block)
        hashes.append(parent)
    return hashes


def test_hash_block_tokens_is_stable_blake2b_of_parent_and_tokens():
    first = hash_block_tokens(None, [1, 2, 3, 4])
    second = hash_block_tokens(first, [5, 6, 7, 8])
    # Fixed values: a change here breaks routers and workers that disagree on the version.
    assert first == 15195315728730727403
    assert second == 15903411287830608657
    expected = hashlib.blake2b(
        first.to_bytes(8, "little") + array("q", [5, 6, 7, 8]).tobytes(), digest_size=8
    )
    assert second == int.from_bytes(expected.digest(), "little")
    assert hash_block_tokens(None, [5, 6, 7, 8]) != second


def test_allocate_takes_free_blocks_in_order():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(10)))

    assert bm.can_allocate(seq)
    bm.allocate(seq)

    assert seq.block_table == [0, 1, 2]
    assert bm.num_free_blocks == 5
    assert [bm.ref_count(i) for i in range(4)] == [1, 1, 1, 0]
    assert seq.num_cached_tokens == 0
    assert seq.num_computed_tokens == 0
    assert bm.usage == pytest.approx(3 / 8)


def test_cache_full_blocks_emits_block_stored_with_chained_parent_hashes():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(10)))
    bm.allocate(seq)
    compute(bm, seq)
    h = chain([0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 100, 101])

    assert bm.take_events() == [BlockStored(block_hashes=h[:2], parent_hash=None)]
    assert bm.block_hash(0) == h[0]
    assert bm.block_hash(1) == h[1]
    assert bm.block_hash(2) is None

    # Decode two tokens into the third block; it is stored once it is full and computed.
    seq.token_ids += [100, 101]
    compute(bm, seq)

    assert bm.take_events() == [BlockStored(block_hashes=[h[2]], parent_hash=h[1])]
    assert bm.take_events() == []
    assert seq.block_hashes == h


def test_allocate_reuses_cached_prefix_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = make_seq(list(range(10)), "a")
    bm.allocate(first)
    compute(bm, first)
    second = make_seq([*range(8), 50, 51, 52], "b")

    assert bm.match_prefix(second) == [0, 1]
    bm.allocate(second)

    assert second.block_table == [0, 1, 3]
    assert second.num_cached_tokens == 8
    assert second.num_computed_tokens == 8
    assert [bm.ref_count(i) for i in range(4)] == [2, 2, 1, 1]
    assert bm.num_free_blocks == 4


def test_deallocate_keeps_cached_blocks_for_the_next_request():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = make_seq(list(range(10)), "a")
    bm.allocate(first)
    compute(bm, first)
    bm.deallocate(first)
    bm.take_events()

    assert first.block_table == []
    assert bm.num_free_blocks == 8
    assert bm.num_cached_blocks == 2

    again = make_seq(list(range(10)), "b")
    bm.allocate(again)
    compute(bm, again)

    assert again.block_table == [0, 1, 3]  # block 2 went to the back of the free list
    assert again.num_cached_tokens == 8
    assert bm.take_events() == []  # nothing new was stored or removed


def test_full_prompt_hit_recomputes_the_last_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = make_seq(list(range(8)), "a")
    bm.allocate(first)
    compute(bm, first)
    bm.take_events()
    second = make_seq(list(range(8)), "b")

    assert bm.match_prefix(second) == [0]
    bm.allocate(second)
    assert second.block_table == [0, 2]
    assert second.num_cached_tokens == 4

    compute(bm, second)
    assert bm.block_hash(2) is None  # its hash is already cached in block 1
    assert bm.take_events() == []


def test_identical_prompts_admitted_together_store_each_hash_once():
    bm = BlockManager(num_blocks=8, block_size=4)
    short = make_seq(list(range(8)), "a")
    long = make_seq(list(range(12)), "b")
    bm.allocate(short)
    bm.allocate(long)  # both miss: nothing is computed yet
    compute(bm, short)
    compute(bm, long)
    h = chain([0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11])

    assert bm.take_events() == [
        BlockStored(block_hashes=h[:2], parent_hash=None),
        BlockStored(block_hashes=[h[2]], parent_hash=h[1]),
    ]
    assert [bm.block_hash(i) for i in range(5)] == [h[0], h[1], None, None, h[2]]


def test_stored_block_brings_back_its_evicted_parent_from_a_private_copy():
    bm = BlockManager(num_blocks=5, block_size=2)
    owner = make_seq([1, 2], "owner")
    bm.allocate(owner)
    compute(bm, owner)  # block 0 holds h0
    copy = make_seq([1, 2], "copy")
    bm.allocate(copy)  # a whole-prompt hit is recomputed, so block 1 is a private copy of h0
    compute(bm, copy)
    bm.deallocate(owner)
    evictor = make_seq([7] * 7, "evictor")
    bm.allocate(evictor)  # blocks 2, 3, 4, then evicts block 0
    bm.deallocate(evictor)
    h = chain([1, 2], [3, 4])
    assert bm.take_events() == [
        BlockStored(block_hashes=[h[0]], parent_hash=None),
        BlockRemoved(block_hashes=[h[0]]),
    ]

    copy.token_ids += [3, 4]
    bm.append_slot(copy)
    compute(bm, copy)

    assert bm.take_events() == [BlockStored(block_hashes=h, parent_hash=None)]
    assert bm.block_hash(1) == h[0]


def test_eviction_reuses_least_recently_freed_block_and_emits_block_removed():
    bm = BlockManager(num_blocks=4, block_size=2)
    first = make_seq([1, 2, 3, 4, 5], "a")
    bm.allocate(first)  # blocks 0, 1, 2
    compute(bm, first)
    h = chain([1, 2], [3, 4])
    bm.deallocate(first)  # tail first: 2 is free, then 1 and 0 become evictable in that order
    assert bm.take_events() == [BlockStored(block_hashes=h, parent_hash=None)]

    other = make_seq([9] * 7, "b")
    assert bm.can_allocate(other)
    bm.allocate(other)

    assert other.block_table == [3, 2, 1, 0]  # plain free blocks first, then oldest cached
    assert bm.take_events() == [BlockRemoved(block_hashes=[h[1], h[0]])]
    assert bm.num_cached_blocks == 0
    assert bm.num_free_blocks == 0


def test_cached_hit_on_evictable_block_uses_a_free_slot():
    bm = BlockManager(num_blocks=3, block_size=4)
    first = make_seq(list(range(8)), "a")
    bm.allocate(first)
    compute(bm, first)

    sharer = make_seq([*range(8), 9], "b")  # hits both of first's blocks while it runs
    stranger = make_seq(list(range(100, 112)), "c")
    assert bm.can_allocate(sharer)
    assert not bm.can_allocate(stranger)

    bm.deallocate(first)  # both cached blocks become evictable: free count 3
    late = make_seq([*range(8), 9, 10, 11, 12, 13], "d")  # 4 blocks: 2 cached + 2 new > 3
    assert bm.match_prefix(late) == [0, 1]
    assert not bm.can_allocate(late)
    with pytest.raises(RuntimeError, match="not enough free blocks"):
        bm.allocate(late)
    assert bm.num_free_blocks == 3


def test_can_append_needs_a_free_block_only_when_a_block_starts():
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq([1, 2, 3, 4], "a")
    bm.allocate(seq)
    filler = make_seq([5], "b")
    bm.allocate(filler)
    compute(bm, seq)

    assert bm.can_append(seq)  # the last token still fits block 0
    seq.token_ids.append(6)
    assert not bm.can_append(seq)

    bm.deallocate(filler)
    assert bm.can_append(seq)
    bm.append_slot(seq)
    assert seq.block_table == [0, 1]
    bm.append_slot(seq)  # no-op: the slot exists
    assert seq.block_table == [0, 1]
    assert bm.num_free_blocks == 0


def test_reset_prefix_cache_refuses_while_in_use_then_clears():
    bm = BlockManager(num_blocks=4, block_size=2)
    seq = make_seq([1, 2, 3, 4, 5])
    bm.allocate(seq)
    compute(bm, seq)

    assert not bm.reset_prefix_cache()
    bm.deallocate(seq)
    bm.take_events()
    assert bm.reset_prefix_cache()

    assert bm.take_events() == [AllBlocksCleared()]
    assert bm.num_cached_blocks == 0
    assert bm.num_free_blocks == 4
    assert bm.match_prefix(make_seq([1, 2, 3, 4, 5], "b")) == []


def test_deallocate_everything_returns_free_count_to_start():
    bm = BlockManager(num_blocks=16, block_size=4)
    seqs = [make_seq([i % 3] * (5 + i), f"r{i}") for i in range(6)]
    for seq in seqs:
        bm.allocate(seq)
        compute(bm, seq)
    assert bm.num_free_blocks < 16
    for seq in seqs:
        bm.deallocate(seq)

    assert bm.num_free_blocks == 16
    assert all(bm.ref_count(i) == 0 for i in range(16))


def test_block_manager_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(num_blocks=4, block_size=0)
