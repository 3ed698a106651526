"""The router's whole placement of a request: decode worker, then local or remote prefill."""

import pytest

from proto.messages import (
    BlockStored,
    InstanceId,
    KVEventBatch,
    LoadMetrics,
    WorkerInfo,
    WorkerRole,
)
from shared.errors import Unavailable
from shared.kv_hash import hash_prompt_blocks
from shared.routing.disagg import DisaggPolicy
from shared.routing.placement import Placement, place
from shared.routing.router import Router

BS = 16
MODEL = "m"
DECODE = InstanceId("d0")
PREFILLS = [InstanceId("p0"), InstanceId("p1")]


def worker(
    worker_id: InstanceId,
    role: WorkerRole,
    *,
    kv_agent: str = "shm",
    model: str = MODEL,
    is_draining: bool = False,
) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        model=model,
        role=role,
        subject=f"w.{worker_id}",
        max_num_seqs=8,
        num_kv_blocks=10_000,
        is_draining=is_draining,
        kv_agent=kv_agent,
        kv_block_size=BS,
    )


def cluster(**decode_fields) -> list[WorkerInfo]:
    return [
        worker(DECODE, WorkerRole.DECODE, **decode_fields),
        *(worker(p, WorkerRole.PREFILL) for p in PREFILLS),
    ]


def prompt(num_tokens: int, first: int = 0) -> list[int]:
    return list(range(first, first + num_tokens))


def run_place(
    router: Router,
    workers: list[WorkerInfo],
    token_ids: list[int],
    disagg: DisaggPolicy | None = None,
) -> Placement:
    return place(
        router,
        workers,
        MODEL,
        hash_prompt_blocks(token_ids, BS),
        len(token_ids),
        block_size=BS,
        disagg=disagg or DisaggPolicy(),
    )


def store(router: Router, worker_id: InstanceId, token_ids: list[int]) -> None:
    hashes = hash_prompt_blocks(token_ids, BS)
    batch = KVEventBatch(worker_id=worker_id, seq=1, events=[BlockStored(block_hashes=hashes)])
    assert not router.apply(worker_id, batch).needs_resync


def test_place_prefills_a_long_uncached_prompt_remotely_and_records_both_loads():
    router = Router()
    token_ids = prompt(4096)  # 256 blocks, none cached

    placement = run_place(router, cluster(), token_ids)

    assert placement.decode.worker_id == DECODE
    assert placement.num_decode_cached_tokens == 0
    assert placement.is_remote_prefill
    assert placement.prefill is not None
    prefill_load = router.load_of(placement.prefill.worker_id)
    assert prefill_load is not None
    assert (prefill_load.num_pending_requests, prefill_load.num_pending_prefill_blocks) == (1, 256)
    decode_load = router.load_of(DECODE)
    assert decode_load is not None
    # The decode worker receives the prompt's KV but computes none of it.
    assert (decode_load.num_pending_blocks, decode_load.num_pending_prefill_blocks) == (256, 0)


def test_place_spreads_remote_prefills_by_their_recorded_load():
    router = Router()

    first = run_place(router, cluster(), prompt(4096))
    second = run_place(router, cluster(), prompt(4096, first=10_000))

    assert first.prefill is not None
    assert second.prefill is not None
    assert {first.prefill.worker_id, second.prefill.worker_id} == set(PREFILLS)


def test_place_prefers_the_prefill_worker_that_caches_the_prompt():
    router = Router()
    token_ids = prompt(4096)
    store(router, PREFILLS[1], token_ids[:2048])

    placement = run_place(router, cluster(), token_ids)

    assert placement.prefill is not None
    assert (placement.prefill.worker_id, placement.prefill.overlap_blocks) == (PREFILLS[1], 128)


def test_place_prefills_locally_when_the_decode_worker_caches_most_of_the_prompt():
    router = Router()
    token_ids = prompt(4096)
    store(router, DECODE, token_ids[:3584])  # 512 uncached tokens: under 2,048

    placement = run_place(router, cluster(), token_ids)

    assert placement.prefill is None
    assert placement.num_decode_cached_tokens == 3584
    assert all(router.load_of(p) is None for p in PREFILLS)
    decode_load = router.load_of(DECODE)
    assert decode_load is not None
    assert (decode_load.num_pending_blocks, decode_load.num_pending_prefill_blocks) == (256, 32)


def test_place_prefills_a_short_prompt_locally():
    router = Router()

    placement = run_place(router, cluster(), prompt(100))

    assert placement.prefill is None
    assert not placement.is_remote_prefill
    assert all(router.load_of(p) is None for p in PREFILLS)


@pytest.mark.parametrize(
    "prefill_fields",
    [
        {"is_draining": True},
        {"model": "other"},
        {"kv_agent": ""},  # cannot send KV
    ],
)
def test_place_prefills_locally_without_a_usable_prefill_worker(prefill_fields):
    router = Router()
    workers = [
        worker(DECODE, WorkerRole.DECODE),
        *(worker(p, WorkerRole.PREFILL, **prefill_fields) for p in PREFILLS),
    ]

    assert run_place(router, workers, prompt(4096)).prefill is None
    assert run_place(router, workers[:1], prompt(4096)).prefill is None  # no prefill pool


def test_place_prefills_locally_when_the_decode_worker_cannot_receive_kv():
    router = Router()

    placement = run_place(router, cluster(kv_agent=""), prompt(4096))

    assert placement.prefill is None
    assert all(router.load_of(p) is None for p in PREFILLS)


def test_place_never_sends_a_request_to_a_prefill_worker_to_decode():
    router = Router()
    workers = cluster()
    workers.append(worker(InstanceId("d1"), WorkerRole.DECODE, is_draining=True))

    decisions = {run_place(router, workers, prompt(64, first=i)).decode.worker_id for i in range(8)}

    assert decisions == {DECODE}


def test_place_without_a_serving_worker_is_unavailable():
    prefill_only = [worker(p, WorkerRole.PREFILL) for p in PREFILLS]
    with pytest.raises(Unavailable, match="no live worker serves model 'm'"):
        run_place(Router(), prefill_only, prompt(4096))


def report(worker_id: InstanceId, *, wait_s: float, per_token_s: float = 1e-4) -> LoadMetrics:
    return LoadMetrics(
        worker_id=worker_id,
        num_running=0,
        num_waiting=0,
        num_free_blocks=10_000,
        num_total_blocks=10_000,
        kv_usage=0.0,
        predicted_wait_s=wait_s,
        wait_per_token_s=per_token_s,
    )


def test_place_prefills_locally_when_the_prefill_pool_queue_is_much_longer():
    """Conditional disaggregation by queue: a prefill pool that would start the prompt more
    than ``max_extra_wait_s`` after the decode worker would leaves it to the decode worker."""
    router = Router()
    router.update_load(report(DECODE, wait_s=0.2))
    for prefill_id in PREFILLS:
        router.update_load(report(prefill_id, wait_s=1.5))
    placement = run_place(router, cluster(), prompt(4096))
    assert not placement.is_remote_prefill
    decode_load = router.load_of(DECODE)
    assert decode_load is not None
    assert decode_load.num_pending_prefill_blocks == 256  # the decode worker computes it
    assert all(router.load_of(p).num_pending_requests == 0 for p in PREFILLS)  # type: ignore[union-attr]
    # The prefill decision it dropped is not counted: one decision, the decode worker's.
    assert router.stats.num_decisions == 1
    assert router.stats.num_decisions_by_worker == {DECODE: 1}

    # One prefill worker that keeps up is enough for the prompt to go remote.
    router = Router()
    router.update_load(report(DECODE, wait_s=0.2))
    router.update_load(report(PREFILLS[0], wait_s=1.5))
    router.update_load(report(PREFILLS[1], wait_s=0.3))
    assert run_place(router, cluster(), prompt(4096)).is_remote_prefill


def test_the_prompts_routed_since_a_report_count_in_the_prefill_wait():
    router = Router()
    router.update_load(report(DECODE, wait_s=0.0))
    for prefill_id in PREFILLS:
        # 4,096 tokens at 1e-4 s each: every prompt routed adds 0.41 s to that worker's wait.
        router.update_load(report(prefill_id, wait_s=0.0))
    policy = DisaggPolicy(max_extra_wait_s=1.0)
    remote = [run_place(router, cluster(), prompt(4096, first=i * 5000), policy) for i in range(8)]
    # The prefill workers take prompts until each has over a second of them queued (three
    # each); the seventh goes to the decode worker, whose own queue then makes the pool
    # worth its wait again.
    assert [p.is_remote_prefill for p in remote] == [True] * 6 + [False, True]


def test_max_extra_wait_inf_always_sends_long_prompts_to_the_prefill_pool():
    policy = DisaggPolicy(max_extra_wait_s=float("inf"))
    assert policy.is_worth_the_wait(1e9, 0.0)
    assert not DisaggPolicy().is_worth_the_wait(1.5, 0.2)
    with pytest.raises(ValueError, match="max_extra_wait_s"):
        DisaggPolicy(max_extra_wait_s=float("nan"))
