import random
from collections import Counter
from dataclasses import replace

import pytest

from proto.messages import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    InstanceId,
    KVEvent,
    KVEventBatch,
    LoadMetrics,
)
from shared.errors import Unavailable
from shared.kv_hash import hash_block_tokens
from shared.routing.cost import Decision, RoutingMode, RoutingPolicy, choose_worker
from shared.routing.router import Router

WORKERS = [InstanceId(f"w{i}") for i in range(8)]


def chain(*block_ids: int, parent: BlockHash | None = None) -> list[BlockHash]:
    hashes: list[BlockHash] = []
    for block_id in block_ids:
        parent = hash_block_tokens(parent, [block_id])
        hashes.append(parent)
    return hashes


def store(router: Router, worker_id: InstanceId, seq: int, hashes: list[BlockHash]) -> None:
    batch = KVEventBatch(worker_id=worker_id, seq=seq, events=[BlockStored(block_hashes=hashes)])
    assert not router.apply(worker_id, batch).needs_resync


def report(
    worker_id: InstanceId, active_blocks: int = 0, waiting: int = 0, total_blocks: int = 10_000
) -> LoadMetrics:
    return LoadMetrics(
        worker_id=worker_id,
        num_running=0,
        num_waiting=waiting,
        num_free_blocks=total_blocks - active_blocks,
        num_total_blocks=total_blocks,
        kv_usage=active_blocks / total_blocks,
    )


def test_route_sends_a_prompt_to_the_worker_with_the_longest_cached_prefix():
    router = Router()
    prompt = chain(*range(10))
    store(router, WORKERS[0], 1, prompt[:3])
    store(router, WORKERS[1], 1, prompt[:8])
    store(router, WORKERS[2], 1, chain(99, 98))

    decision = router.route(prompt, WORKERS[:4])

    assert decision == Decision(
        worker_id=WORKERS[1], overlap_blocks=8, cost=2.0, mode=RoutingMode.KV, num_prompt_blocks=10
    )
    assert router.load_of(WORKERS[1]).num_pending_blocks == 10


def test_route_keeps_off_a_worker_over_its_cap_despite_the_best_overlap():
    router = Router(RoutingPolicy(max_kv_usage=0.8))
    prompt = chain(*range(20))
    store(router, WORKERS[0], 1, prompt)
    router.update_load(report(WORKERS[0], active_blocks=8_001))
    router.update_load(report(WORKERS[1], active_blocks=7_000))

    decision = router.route(prompt, WORKERS[:2])

    assert (decision.worker_id, decision.overlap_blocks, decision.is_overloaded) == (
        WORKERS[1],
        0,
        False,
    )


def burst(router: Router, record: bool) -> Counter[InstanceId]:
    system = chain(*range(32))
    store(router, WORKERS[0], 1, system)  # only w0 caches the shared system prompt
    counts: Counter[InstanceId] = Counter()
    for request in range(800):
        prompt = system + chain(*range(1000 * request, 1000 * request + 8), parent=system[-1])
        counts[router.route(prompt, WORKERS, record=record).worker_id] += 1
    return counts


def test_note_routed_spreads_a_burst_behind_a_shared_system_prompt():
    counts = burst(Router(), record=True)

    # pending work makes w0 costlier with each request, and past 32 pending requests every
    # worker is over the waiting cap, so the least pressed takes the next one
    assert counts == dict.fromkeys(WORKERS, 100)


def test_without_a_cap_the_cached_worker_takes_a_share_bounded_by_the_work_it_saves():
    counts = burst(Router(RoutingPolicy(max_num_waiting=10_000, max_kv_usage=1.0)), record=True)

    # w0 prefills 8 blocks per request, the others 40: each request there adds 8 + 0.05 * 40
    # to its cost, elsewhere 40 + 0.05 * 40, so w0 settles at about 4.2x the others' count
    assert counts[WORKERS[0]] == 302
    assert sorted(counts[w] for w in WORKERS[1:]) == [71, 71, 71, 71, 71, 71, 72]


def test_without_note_routed_a_burst_piles_onto_the_cached_worker():
    counts = burst(Router(), record=False)

    assert counts == {WORKERS[0]: 800}


def test_pending_prefill_ends_when_the_worker_stores_the_prompts_last_block():
    router = Router()
    prompt = chain(*range(10))
    store(router, WORKERS[0], 1, prompt[:4])

    decision = router.route(prompt, WORKERS[:1])

    load = router.load_of(WORKERS[0])
    assert decision.overlap_blocks == 4
    assert (load.num_pending_prefill_blocks, load.num_pending_blocks) == (6, 10)
    store(router, WORKERS[0], 2, prompt[4:9])  # a run that is not the end of the prompt
    assert load.num_pending_prefill_blocks == 6
    store(router, WORKERS[0], 3, prompt[9:])
    assert (load.num_pending_prefill_blocks, load.num_pending_blocks) == (0, 10)
    router.update_load(report(WORKERS[0], active_blocks=10))
    assert (load.num_pending_requests, load.num_pending_blocks, load.num_active_blocks) == (
        0,
        0,
        10,
    )


def test_fresh_load_report_replaces_pending_and_routing_follows_it():
    router = Router()
    prompt = chain(*range(4))
    for _ in range(3):
        router.route(prompt, WORKERS[:2])
    assert router.load_of(WORKERS[0]).num_pending_requests == 2

    router.update_load(report(WORKERS[0], active_blocks=0))
    router.update_load(report(WORKERS[1], active_blocks=50))

    assert router.load_of(WORKERS[0]).num_pending_requests == 0
    assert router.route(prompt, WORKERS[:2]).worker_id == WORKERS[0]


def test_route_counts_hit_rate_and_decisions():
    router = Router()
    prompt = chain(*range(10))
    store(router, WORKERS[0], 1, prompt[:6])

    router.route(prompt, WORKERS[:1])
    router.route(chain(50, 51), WORKERS[:1])

    assert router.stats.num_decisions == 2
    assert (router.stats.num_prompt_blocks, router.stats.num_overlap_blocks) == (12, 6)
    assert router.stats.hit_rate == 0.5
    assert router.stats.num_decisions_by_worker == {WORKERS[0]: 2}


def test_one_router_answers_for_prefill_and_decode_pools_separately():
    prefill_pool, decode_pool = WORKERS[:2], WORKERS[2:4]
    router = Router()
    prompt = chain(*range(12))
    store(router, WORKERS[1], 1, prompt[:10])  # a prefill worker
    store(router, WORKERS[3], 1, prompt[:4])  # a decode worker

    prefill = router.route(prompt, prefill_pool)
    decode = router.route(prompt, decode_pool, policy=RoutingPolicy(prefill_weight=0.5))

    assert (prefill.worker_id, prefill.overlap_blocks) == (WORKERS[1], 10)
    assert (decode.worker_id, decode.overlap_blocks) == (WORKERS[3], 4)


def test_round_robin_random_and_least_loaded_modes():
    prompt = chain(*range(6))
    rr = Router(RoutingPolicy(mode=RoutingMode.ROUND_ROBIN))
    store(rr, WORKERS[2], 1, prompt)
    picks = [rr.route(prompt, WORKERS[:3]) for _ in range(4)]
    assert [d.worker_id for d in picks] == [WORKERS[0], WORKERS[1], WORKERS[2], WORKERS[0]]
    assert [d.overlap_blocks for d in picks] == [0, 0, 6, 0]

    least = Router(RoutingPolicy(mode=RoutingMode.LEAST_LOADED))
    store(least, WORKERS[0], 1, prompt)
    least.update_load(report(WORKERS[0], active_blocks=100))
    least.update_load(report(WORKERS[1], active_blocks=10))
    decision = least.route(prompt, WORKERS[:2])
    assert (decision.worker_id, decision.overlap_blocks, decision.mode) == (
        WORKERS[1],
        0,
        RoutingMode.LEAST_LOADED,
    )

    first = Router(RoutingPolicy(mode=RoutingMode.RANDOM), seed=3)
    second = Router(RoutingPolicy(mode=RoutingMode.RANDOM), seed=3)
    picks_a = [first.route(prompt, WORKERS).worker_id for _ in range(40)]
    picks_b = [second.route(prompt, WORKERS).worker_id for _ in range(40)]
    assert picks_a == picks_b
    assert len(set(picks_a)) > 4


def test_remove_worker_forgets_its_blocks_and_load():
    router = Router()
    prompt = chain(*range(5))
    store(router, WORKERS[0], 1, prompt)
    router.update_load(report(WORKERS[0], active_blocks=1))
    assert router.route(prompt, WORKERS[:2]).worker_id == WORKERS[0]

    router.remove_worker(WORKERS[0])

    assert router.index.snapshot() == {}
    assert router.load_of(WORKERS[0]) is None
    assert router.stats.num_decisions_by_worker == {}
    assert router.route(prompt, WORKERS[:2]).overlap_blocks == 0


def test_route_without_candidates_is_unavailable():
    with pytest.raises(Unavailable, match="no worker"):
        Router().route(chain(1), [])


# --- replicas ----------------------------------------------------------------------------------


def worker_streams(rng: random.Random) -> dict[InstanceId, list[KVEventBatch]]:
    """Each worker's batches, numbered in order, with shared prefixes, removals and a clear."""
    systems = [chain(7000 + i, 1, 2, 3, 4) for i in range(3)]
    streams: dict[InstanceId, list[KVEventBatch]] = {}
    for worker_id in WORKERS[:5]:
        held: set[BlockHash] = set()
        batches = []
        for seq in range(1, 41):
            system = rng.choice(systems)
            tail = chain(
                *(rng.randrange(10**6) for _ in range(rng.randrange(1, 6))), parent=system[-1]
            )
            events: list[KVEvent] = [BlockStored(block_hashes=system + tail)]
            held.update(system + tail)
            if rng.random() < 0.4:
                gone = rng.sample(sorted(held), k=min(4, len(held)))
                held.difference_update(gone)
                events.append(BlockRemoved(block_hashes=gone))
            if seq == 25 and worker_id == WORKERS[1]:
                events.append(AllBlocksCleared())
                held.clear()
            batches.append(KVEventBatch(worker_id=worker_id, seq=seq, events=events))
        streams[worker_id] = batches
    return streams


def interleave(
    streams: dict[InstanceId, list[KVEventBatch]], rng: random.Random
) -> list[KVEventBatch]:
    """A random merge that keeps each worker's own order."""
    cursors = dict.fromkeys(streams, 0)
    merged = []
    while cursors:
        worker_id = rng.choice(sorted(cursors))
        merged.append(streams[worker_id][cursors[worker_id]])
        cursors[worker_id] += 1
        if cursors[worker_id] == len(streams[worker_id]):
            del cursors[worker_id]
    return merged


@pytest.mark.parametrize("temperature", [0.0, 3.0])
def test_replicas_fed_the_same_events_in_any_interleaving_agree(temperature):
    streams = worker_streams(random.Random(11))
    policy = RoutingPolicy(temperature=temperature)
    replicas = [Router(policy, seed=5), Router(policy, seed=5)]
    for replica, order_seed in zip(replicas, (1, 2), strict=True):
        for batch in interleave(streams, random.Random(order_seed)):
            assert not replica.apply(batch.worker_id, batch).needs_resync

    first, second = (replica.index.snapshot() for replica in replicas)
    assert first == second
    assert sum(len(blocks) for blocks in first.values()) > 100

    rng = random.Random(9)
    prompts = [batch.events[0].block_hashes for batch in streams[WORKERS[2]]]
    decisions: list[list[Decision]] = [[], []]
    for step in range(200):
        prompt = rng.choice(prompts)
        metrics = report(rng.choice(WORKERS[:5]), active_blocks=rng.randrange(5000))
        for replica, made in zip(replicas, decisions, strict=True):
            if step % 10 == 0:
                replica.update_load(metrics)
            made.append(replica.route(prompt, WORKERS[:5]))
    assert decisions[0] == decisions[1]
    assert len({d.worker_id for d in decisions[0]}) > 1
    assert sum(d.overlap_blocks for d in decisions[0]) > 0


def test_route_matches_choose_worker_computed_from_scratch():
    rng = random.Random(4)
    router = Router(RoutingPolicy(max_num_waiting=6))
    workers = WORKERS[:5]
    system = chain(*range(16))
    prompts = [system + chain(i, i + 1, parent=system[-1]) for i in range(0, 40, 2)]
    seqs = dict.fromkeys(workers, 0)
    for turn in range(300):
        action = rng.random()
        if action < 0.2:
            router.update_load(report(rng.choice(workers), rng.randrange(9000), rng.randrange(8)))
        elif action < 0.4:
            worker_id = rng.choice(workers)
            seqs[worker_id] += 1
            store(router, worker_id, seqs[worker_id], rng.choice(prompts))
        prompt = rng.choice(prompts)
        loads = {w: replace(router.load_of(w)) for w in workers if router.load_of(w)}
        overlaps = router.index.overlaps(prompt, workers)

        expected = choose_worker(workers, overlaps, len(prompt), loads, router.policy, turn=turn)

        assert router.route(prompt, workers) == expected
