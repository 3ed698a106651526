import random

import pytest

from proto.messages import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    InstanceId,
    KVEvent,
    KVEventBatch,
)
from shared.kv_hash import hash_block_tokens
from shared.routing.index import FIRST_SEQ, ApplyStatus, KVIndex

W1 = InstanceId("w1")
W2 = InstanceId("w2")
W3 = InstanceId("w3")


def chain(*block_ids: int, parent: BlockHash | None = None) -> list[BlockHash]:
    """Chained hashes of one-token blocks, as a worker would compute them."""
    hashes: list[BlockHash] = []
    for block_id in block_ids:
        parent = hash_block_tokens(parent, [block_id])
        hashes.append(parent)
    return hashes


def batch(worker_id: InstanceId, seq: int, *events: KVEvent) -> KVEventBatch:
    return KVEventBatch(worker_id=worker_id, seq=seq, events=list(events))


def stored(hashes: list[BlockHash]) -> BlockStored:
    return BlockStored(block_hashes=hashes)


class Feeder:
    """Numbers each worker's batches from FIRST_SEQ, as a worker does."""

    def __init__(self, index: KVIndex) -> None:
        self.index = index
        self.seqs: dict[InstanceId, int] = {}

    def send(self, worker_id: InstanceId, *events: KVEvent) -> ApplyStatus:
        seq = self.seqs.get(worker_id, FIRST_SEQ - 1) + 1
        self.seqs[worker_id] = seq
        return self.index.apply(worker_id, batch(worker_id, seq, *events)).status


# --- overlaps ----------------------------------------------------------------------------------


def test_overlaps_counts_each_workers_longest_cached_prefix():
    prompt = chain(1, 2, 3, 4, 5, 6)
    index = KVIndex()
    feed = Feeder(index)
    feed.send(W1, stored(prompt[:4]))
    feed.send(W2, stored(prompt[:2]))
    feed.send(W3, stored(chain(9, 9)))

    assert index.overlaps(prompt) == {W1: 4, W2: 2}
    assert index.overlaps(prompt, [W2, W3]) == {W2: 2}
    assert index.overlaps(prompt, [InstanceId("unknown")]) == {}
    assert index.overlaps([]) == {}


def test_overlaps_stops_at_first_miss():
    prompt = chain(1, 2, 3, 4, 5)
    index = KVIndex()
    feed = Feeder(index)
    feed.send(W1, stored(prompt), BlockRemoved(block_hashes=[prompt[2]]))
    feed.send(W2, stored(prompt[3:]))  # later blocks alone are no prefix

    assert index.overlaps(prompt) == {W1: 2}
    assert index.blocks_of(W1) == {prompt[0], prompt[1], prompt[3], prompt[4]}


def test_overlaps_follows_a_branching_prefix_tree():
    system = chain(1, 2, 3)
    left = chain(10, 11, parent=system[-1])
    right = chain(20, parent=system[-1])
    index = KVIndex()
    feed = Feeder(index)
    feed.send(W1, stored(system + left))
    feed.send(W2, stored(system + right))

    assert index.overlaps(system + left) == {W1: 5, W2: 3}
    assert index.overlaps(system + right) == {W1: 3, W2: 4}
    assert index.num_blocks == 6
    assert index.num_entries == 9


# --- sequence numbers, resync, removal ---------------------------------------------------------


def test_apply_detects_gaps_duplicates_and_resets():
    a, b, c, d = chain(1, 2, 3, 4)
    index = KVIndex()

    first = index.apply(W1, batch(W1, 1, stored([a])))
    assert (first.status, first.needs_resync) == (ApplyStatus.APPLIED, False)
    assert index.expected_seq(W1) == 2

    gap = index.apply(W1, batch(W1, 4, stored([a, b])))  # 2 and 3 were lost
    assert (gap.status, gap.needs_resync, gap.expected_seq) == (ApplyStatus.GAP, True, 2)
    assert index.blocks_of(W1) == {a, b}  # the facts it carried still apply
    assert index.expected_seq(W1) == 5

    duplicate = index.apply(W1, batch(W1, 3, stored([c])))
    assert (duplicate.status, duplicate.needs_resync) == (ApplyStatus.DUPLICATE, False)
    assert index.blocks_of(W1) == {a, b}

    reset = index.apply(W1, batch(W1, FIRST_SEQ, stored([d])))  # the worker restarted
    assert (reset.status, reset.needs_resync) == (ApplyStatus.RESET, True)
    assert index.blocks_of(W1) == {d}
    assert index.expected_seq(W1) == 2
    assert (index.stats.num_gaps, index.stats.num_duplicates, index.stats.num_resets) == (1, 1, 1)


def test_apply_asks_for_resync_when_first_batch_seen_is_mid_stream():
    result = KVIndex().apply(W1, batch(W1, 7, stored(chain(1))))

    assert (result.status, result.expected_seq, result.needs_resync) == (
        ApplyStatus.GAP,
        None,
        True,
    )


def test_apply_rejects_a_batch_naming_another_worker():
    with pytest.raises(ValueError, match="'w2' arrived as 'w1'"):
        KVIndex().apply(W1, batch(W2, 1))


def test_resync_after_gap_restores_exact_state():
    a, b, c, d, e = chain(1, 2, 3, 4, 5)
    index = KVIndex()
    index.apply(W2, batch(W2, 1, stored([a, b])))
    index.apply(W1, batch(W1, 1, stored([a, b, c])))
    # batch 2 (lost) removed c and stored d; batch 3 arrives
    result = index.apply(W1, batch(W1, 3, stored([e])))
    assert result.needs_resync
    assert index.blocks_of(W1) == {a, b, c, e}  # c is stale, d is missing

    index.resync(W1, [a, b, d, e], seq=3)

    assert index.snapshot() == {W1: frozenset({a, b, d, e}), W2: frozenset({a, b})}
    assert index.overlaps([a, b, d]) == {W1: 3, W2: 2}
    assert index.num_live_entries == 6
    assert index.apply(W1, batch(W1, 3, stored([c]))).status is ApplyStatus.DUPLICATE
    assert index.apply(W1, batch(W1, 4, stored([c]))).status is ApplyStatus.APPLIED
    assert index.blocks_of(W1) == {a, b, c, d, e}
    assert index.stats.num_resyncs == 1


def test_remove_worker_drops_all_its_blocks_and_its_seq():
    shared = chain(1, 2, 3)
    index = KVIndex()
    feed = Feeder(index)
    feed.send(W1, stored(shared + chain(4, parent=shared[-1])))
    feed.send(W2, stored(shared))

    index.remove_worker(W1)

    assert index.overlaps(shared + chain(4, parent=shared[-1])) == {W2: 3}
    assert index.snapshot() == {W2: frozenset(shared)}
    assert index.num_blocks_of(W1) == 0
    assert index.num_live_entries == 3
    assert index.expected_seq(W1) is None
    index.compact()
    assert (index.num_entries, index.num_blocks) == (3, 3)
    # a worker of the same id starting afresh is applied from its first batch
    assert index.apply(W1, batch(W1, FIRST_SEQ, stored(shared[:1]))).status is ApplyStatus.APPLIED
    assert index.overlaps(shared) == {W1: 1, W2: 3}


def test_remove_last_worker_frees_everything_at_once():
    index = KVIndex()
    Feeder(index).send(W1, stored(chain(1, 2, 3)))

    index.remove_worker(W1)

    assert (index.num_entries, index.num_blocks, index.snapshot()) == (0, 0, {})


def test_all_blocks_cleared_empties_only_that_worker_and_later_stores_apply():
    old = chain(1, 2)
    new = chain(7, 8)
    index = KVIndex()
    feed = Feeder(index)
    feed.send(W2, stored(old))
    feed.send(W1, stored(old), AllBlocksCleared(), stored(new))

    assert index.snapshot() == {W1: frozenset(new), W2: frozenset(old)}
    assert index.overlaps(old) == {W2: 2}
    assert index.overlaps(new) == {W1: 2}
    assert index.num_live_entries == 4


def test_retired_entries_are_compacted_automatically_once_they_dominate():
    index = KVIndex()
    feed = Feeder(index)
    feed.send(W2, stored(chain(100)))
    for round_ in range(5):
        feed.send(W1, AllBlocksCleared(), stored(chain(*range(round_ * 10, round_ * 10 + 10))))
        assert index.num_entries <= 2 * index.num_live_entries

    assert index.num_live_entries == 11
    assert index.stats.num_compactions >= 1


# --- the memory bound --------------------------------------------------------------------------


def test_eviction_keeps_recently_matched_blocks_and_drops_the_oldest():
    a, b, c, d = (chain(block_id) for block_id in (1, 2, 3, 4))
    index = KVIndex(max_entries=3)
    feed = Feeder(index)
    for hashes in (a, b, c):
        feed.send(W1, stored(hashes))
    assert index.overlaps(a) == {W1: 1}  # a is now recently used; b is the oldest

    feed.send(W1, stored(d))

    assert index.blocks_of(W1) == {a[0], c[0], d[0]}
    assert index.num_entries == 3
    assert (index.stats.num_evicted_blocks, index.stats.num_evicted_entries) == (1, 1)


def test_eviction_drops_leaves_before_their_prefix():
    prompt = chain(1, 2, 3)
    index = KVIndex(max_entries=4)
    feed = Feeder(index)
    feed.send(W1, stored(prompt))
    feed.send(W1, stored(chain(8)))
    feed.send(W1, stored(chain(9)))

    assert index.overlaps(prompt) == {W1: 2}
    assert index.num_entries == 4


def test_eviction_counts_every_worker_of_an_evicted_block():
    a, b, c, d, e = (chain(block_id) for block_id in (1, 2, 3, 4, 5))
    index = KVIndex(max_entries=3)
    feed = Feeder(index)
    feed.send(W1, stored(a))
    feed.send(W2, stored(a))  # a second holder counts as a use: a gets a second chance
    for hashes in (b, c, d, e):
        feed.send(W3, stored(hashes))

    assert index.snapshot() == {W1: frozenset(), W2: frozenset(), W3: frozenset(d + e)}
    assert index.num_entries == 2
    assert (index.stats.num_evicted_blocks, index.stats.num_evicted_entries) == (3, 4)


def test_entries_never_exceed_max_entries_under_random_traffic():
    rng = random.Random(7)
    workers = [InstanceId(f"w{i}") for i in range(6)]
    systems = [chain(1000 + i, 1, 2, 3) for i in range(4)]
    index = KVIndex(max_entries=200)
    feed = Feeder(index)
    truth: dict[InstanceId, set[BlockHash]] = {w: set() for w in workers}
    for step in range(600):
        worker_id = rng.choice(workers)
        system = rng.choice(systems)
        hashes = system + chain(
            *(rng.randrange(10**6) for _ in range(rng.randrange(1, 8))), parent=system[-1]
        )
        events: list[KVEvent] = [stored(hashes)]
        truth[worker_id].update(hashes)
        if truth[worker_id] and rng.random() < 0.5:
            gone = rng.sample(sorted(truth[worker_id]), k=min(3, len(truth[worker_id])))
            events.append(BlockRemoved(block_hashes=gone))
            truth[worker_id].difference_update(gone)
        if step % 97 == 0:
            events.append(AllBlocksCleared())
            truth[worker_id].clear()
        feed.send(worker_id, *events)

        assert index.num_entries <= 200
        snapshot = index.snapshot()
        for w, blocks in snapshot.items():
            assert blocks <= truth[w]  # forgetting is allowed, inventing is not

    assert index.stats.num_evicted_entries > 0
    index.compact()
    assert index.num_entries == sum(len(b) for b in index.snapshot().values())
    assert index.num_entries == index.num_live_entries
