import random
from collections import Counter

import pytest

from proto.messages import BlockHash, InstanceId, LoadMetrics
from shared.routing.cost import (
    RoutingPolicy,
    WorkerLoad,
    choose_worker,
)

A = InstanceId("a")
B = InstanceId("b")
C = InstanceId("c")
POLICY = RoutingPolicy(prefill_weight=1.0, decode_weight=1.0, max_kv_usage=0.9, max_num_waiting=4)


def load(
    active_blocks: int = 0, total_blocks: int = 1000, waiting: int = 0, draining: bool = False
) -> WorkerLoad:
    state = WorkerLoad()
    state.update(
        LoadMetrics(
            worker_id=InstanceId("x"),
            num_running=0,
            num_waiting=waiting,
            num_free_blocks=total_blocks - active_blocks,
            num_total_blocks=total_blocks,
            kv_usage=active_blocks / total_blocks,
            is_draining=draining,
        )
    )
    return state


def test_choose_worker_prefers_the_longest_cached_prefix_when_load_is_equal():
    decision = choose_worker([A, B, C], {A: 2, B: 7, C: 5}, 10, {}, POLICY)

    assert (decision.worker_id, decision.overlap_blocks, decision.cost) == (B, 7, 3.0)
    assert decision.num_prompt_blocks == 10
    assert not decision.is_overloaded


def test_choose_worker_trades_cached_prefix_against_load():
    loads = {A: load(active_blocks=100), B: load(active_blocks=10)}

    decision = choose_worker([A, B], {A: 50, B: 0}, 60, loads, POLICY)

    # a: 10 uncached + 100 active = 110; b: 60 uncached + 10 active = 70
    assert (decision.worker_id, decision.cost) == (B, 70.0)


def test_choose_worker_never_picks_a_worker_over_its_kv_cap_while_another_is_under():
    loads = {A: load(active_blocks=901), B: load(active_blocks=850)}

    decision = choose_worker([A, B], {A: 100}, 100, loads, RoutingPolicy(decode_weight=0.0))

    assert decision.worker_id == B
    assert decision.overlap_blocks == 0


def test_choose_worker_never_picks_a_worker_over_its_waiting_cap_while_another_is_under():
    loads = {A: load(waiting=5), B: load(waiting=4, active_blocks=800)}

    decision = choose_worker([A, B], {A: 100}, 100, loads, POLICY)

    assert decision.worker_id == B


def test_choose_worker_counts_pending_requests_against_the_cap():
    loads = {A: load(waiting=3), B: load()}
    loads[A].note_routed(1)
    loads[A].note_routed(1)  # 3 waiting + 2 pending = 5 > 4

    assert choose_worker([A, B], {A: 100}, 100, loads, POLICY).worker_id == B


def test_choose_worker_picks_the_least_pressed_when_all_are_over_the_cap():
    loads = {A: load(active_blocks=990), B: load(active_blocks=950), C: load(waiting=40)}

    decision = choose_worker([A, B, C], {A: 10, C: 10}, 10, loads, POLICY)

    assert (decision.worker_id, decision.is_overloaded) == (B, True)


def test_choose_worker_avoids_draining_workers():
    loads = {A: load(draining=True), B: load(active_blocks=500)}

    assert choose_worker([A, B], {A: 100}, 100, loads, POLICY).worker_id == B
    only = choose_worker([A], {A: 100}, 100, loads, POLICY)
    assert (only.worker_id, only.is_overloaded) == (A, True)


def test_choose_worker_rotates_exact_ties_in_id_order():
    picks = [choose_worker([C, A, B], {}, 4, {}, POLICY, turn=turn).worker_id for turn in range(6)]

    assert picks == [A, B, C, A, B, C]


def test_choose_worker_counts_prefill_already_queued_there():
    loads = {A: load(), B: load()}
    loads[A].note_routed(20, num_new_blocks=15)

    decision = choose_worker([A, B], {A: 10}, 12, loads, POLICY)

    # a: 2 uncached + 15 queued + 20 pending KV = 37; b: 12
    assert (decision.worker_id, decision.cost) == (B, 12.0)
    loads[A].note_stored(BlockHash(7))  # not the pending prompt's last block: no change
    assert loads[A].num_pending_prefill_blocks == 15


def test_choose_worker_treats_unreported_workers_as_idle():
    decision = choose_worker([A, B], {A: 3}, 4, {B: load(active_blocks=1)}, POLICY)

    assert (decision.worker_id, decision.cost) == (A, 1.0)


def test_choose_worker_samples_by_softmax_of_cost_with_temperature():
    policy = RoutingPolicy(temperature=2.0)
    rng = random.Random(1)
    # cost a = 2, b = 2 + 2 * ln(3): probabilities 3/4 and 1/4
    overlaps = {A: 8, B: 8 - 2 * 1.0986122886681098}

    counts = Counter(
        choose_worker([A, B], overlaps, 10, {}, policy, rng=rng).worker_id for _ in range(4000)
    )

    assert 0.72 < counts[A] / 4000 < 0.78
    with pytest.raises(ValueError, match="needs an rng"):
        choose_worker([A, B], overlaps, 10, {}, policy)


def test_choose_worker_sampling_is_reproducible_with_the_same_seed():
    policy = RoutingPolicy(temperature=5.0)

    def run(order: list[InstanceId]) -> list[str]:
        rng = random.Random(42)
        return [
            choose_worker(order, {A: 3, B: 1}, 9, {}, policy, rng=rng).worker_id for _ in range(50)
        ]

    assert run([A, B, C]) == run([C, B, A])


def test_worker_load_report_replaces_pending_estimate():
    state = load(active_blocks=100, waiting=1)
    state.note_routed(30)
    state.note_routed(20)
    assert (state.num_pending_requests, state.num_load_blocks) == (2, 150)
    assert state.pressure(POLICY) == pytest.approx(max(0.15 / 0.9, 3 / 4))

    state.update(
        LoadMetrics(
            worker_id=A,
            num_running=3,
            num_waiting=0,
            num_free_blocks=840,
            num_total_blocks=1000,
            kv_usage=0.16,
        )
    )

    assert (state.num_pending_requests, state.num_pending_blocks, state.num_load_blocks) == (
        0,
        0,
        160,
    )


def test_choose_worker_needs_candidates():
    with pytest.raises(ValueError, match="no candidates"):
        choose_worker([], {}, 1, {}, POLICY)


@pytest.mark.parametrize(
    ("field", "value"),
    [("prefill_weight", -1.0), ("max_kv_usage", 0.0), ("max_num_waiting", 0), ("temperature", -1)],
)
def test_routing_policy_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        RoutingPolicy(**{field: value})
