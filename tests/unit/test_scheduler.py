from typing import Any

import pytest

from proto.messages import FinishReason, RequestId, SamplingParams
from shared.engine.scheduler import BatchPlan, Scheduler, SchedulerConfig
from shared.engine.sequence import Sequence, SequenceStatus

EOS = 2


def make_scheduler(
    num_kv_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 1024,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            num_kv_blocks=num_kv_blocks,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            eos_token_id=EOS,
        )
    )


def add(
    scheduler: Scheduler, request_id: str, num_prompt_tokens: int, base: int = 100, **sampling: Any
) -> Sequence:
    sampling.setdefault("max_tokens", 100)
    prompt = [base + i for i in range(num_prompt_tokens)]
    seq = Sequence(RequestId(request_id), prompt, SamplingParams(**sampling))
    scheduler.add(seq)
    return seq


def ids(seqs: list[Sequence]) -> list[str]:
    return [seq.request_id for seq in seqs]


def step(scheduler: Scheduler, token_id: int = 7) -> BatchPlan:
    plan = scheduler.schedule()
    scheduler.postprocess(plan, [token_id] * len(plan.seqs))
    return plan


def test_schedule_admits_waiting_within_token_budget():
    scheduler = make_scheduler(max_num_batched_tokens=10)
    for name in "abc":
        add(scheduler, name, 4, base=ord(name) * 10)

    plan = scheduler.schedule()

    assert ids(plan.prefill_seqs) == ["a", "b"]
    assert plan.num_new_tokens == [4, 4]
    assert plan.num_prefill_tokens == 8
    assert plan.decode_seqs == []
    assert scheduler.num_running == 2
    assert scheduler.num_waiting == 1


def test_schedule_admits_prompt_over_budget_only_alone():
    scheduler = make_scheduler(max_num_batched_tokens=4)
    add(scheduler, "big", 10)
    add(scheduler, "small", 2, base=500)

    first = step(scheduler)
    second = step(scheduler)

    assert ids(first.seqs) == ["big"]
    assert first.num_prefill_tokens == 10
    assert ids(second.prefill_seqs) == ["small"]
    assert ids(second.decode_seqs) == ["big"]
    assert second.num_new_tokens == [2, 1]


def test_schedule_respects_max_num_seqs():
    scheduler = make_scheduler(max_num_seqs=2)
    for name in "abc":
        add(scheduler, name, 3, base=ord(name) * 10)

    first = step(scheduler)
    second = step(scheduler)

    assert ids(first.seqs) == ["a", "b"]
    assert ids(second.seqs) == ["a", "b"]
    assert second.num_prefill_seqs == 0
    assert scheduler.num_waiting == 1


def test_prefix_hit_shrinks_the_prefill():
    scheduler = make_scheduler(block_size=4)
    add(scheduler, "a", 9)
    step(scheduler)
    add(scheduler, "b", 9)

    plan = scheduler.schedule()

    assert ids(plan.prefill_seqs) == ["b"]
    assert plan.num_new_tokens[0] == 1
    second = scheduler.get(RequestId("b"))
    assert second is not None
    assert second.num_cached_tokens == 8


def test_decode_takes_a_new_block_when_the_last_token_starts_one():
    scheduler = make_scheduler(block_size=4)
    seq = add(scheduler, "a", 4)

    step(scheduler)  # prefill: 4 prompt tokens + 1 sampled
    assert seq.block_table == [0]
    step(scheduler)  # decode of token 5 needs block 1

    assert seq.block_table == [0, 1]
    assert seq.num_computed_tokens == 5
    assert seq.num_tokens == 6


def test_preempts_newest_running_sequence_when_blocks_run_out():
    scheduler = make_scheduler(num_kv_blocks=2, block_size=2)
    older = add(scheduler, "older", 2)
    newer = add(scheduler, "newer", 1, base=500)
    step(scheduler)  # blocks 0 and 1; older now has 3 tokens and needs a block, newer does not

    plan = step(scheduler)

    assert ids(plan.seqs) == ["older"]
    assert ids(plan.preempted) == ["newer"]
    assert older.block_table == [0, 1]
    assert newer.status is SequenceStatus.WAITING
    assert newer.block_table == []
    assert newer.num_computed_tokens == 0
    assert newer.output_token_ids == [7]  # generated tokens are kept for the recompute
    assert list(scheduler.waiting) == [newer]
    assert scheduler.num_preemptions == 1


def test_preempted_sequence_resumes_with_its_tokens_and_cached_prefix():
    scheduler = make_scheduler(num_kv_blocks=3, block_size=4)
    first = add(scheduler, "first", 4, max_tokens=3)
    second = add(scheduler, "second", 4, base=500)
    step(scheduler, token_id=10)  # both hold one full, cached block and need a second

    plan = step(scheduler, token_id=11)
    assert ids(plan.seqs) == ["first"]
    assert ids(plan.preempted) == ["second"]
    assert second.output_token_ids == [10]

    plan = step(scheduler, token_id=12)  # first finishes (max_tokens=3); second still waits
    assert ids(plan.seqs) == ["first"]
    assert first.finish_reason is FinishReason.LENGTH

    plan = step(scheduler, token_id=13)
    assert ids(plan.prefill_seqs) == ["second"]
    assert plan.num_new_tokens == [1]  # its prompt block was still cached
    assert second.num_cached_tokens == 4
    assert second.output_token_ids == [10, 13]
    assert second.status is SequenceStatus.RUNNING


def test_preemption_skips_admission_in_the_same_step():
    scheduler = make_scheduler(num_kv_blocks=2, block_size=2)
    add(scheduler, "older", 2)
    add(scheduler, "newer", 1, base=500)
    step(scheduler)
    add(scheduler, "late", 1, base=900)

    plan = scheduler.schedule()

    assert plan.num_prefill_seqs == 0
    assert ids(list(scheduler.waiting)) == ["newer", "late"]


def test_abort_frees_running_blocks_at_once():
    scheduler = make_scheduler(num_kv_blocks=8)
    seq = add(scheduler, "a", 6)
    step(scheduler)
    assert scheduler.block_manager.num_free_blocks == 6

    aborted = scheduler.abort(RequestId("a"))

    assert aborted is seq
    assert seq.finish_reason is FinishReason.ABORT
    assert seq.status is SequenceStatus.FINISHED
    assert scheduler.block_manager.num_free_blocks == 8
    assert scheduler.num_running == 0
    assert not scheduler.has_unfinished()
    assert scheduler.abort(RequestId("a")) is None


def test_abort_of_waiting_sequence_is_skipped_by_admission():
    scheduler = make_scheduler()
    add(scheduler, "a", 3)
    add(scheduler, "b", 3, base=500)

    assert scheduler.abort(RequestId("a")) is not None
    assert scheduler.num_waiting == 1
    plan = scheduler.schedule()

    assert ids(plan.seqs) == ["b"]
    assert scheduler.num_waiting == 0
    assert not scheduler.waiting


def test_add_rejects_a_duplicate_request_id():
    scheduler = make_scheduler()
    add(scheduler, "a", 3)
    with pytest.raises(ValueError, match="already scheduled"):
        add(scheduler, "a", 3)


@pytest.mark.parametrize(
    ("sampling", "tokens", "num_output", "reason"),
    [
        ({}, [5, EOS, 5], 2, FinishReason.STOP),
        ({"ignore_eos": True, "max_tokens": 3}, [5, EOS, 5, 5], 3, FinishReason.LENGTH),
        ({"min_tokens": 3}, [EOS, EOS, EOS, 5], 3, FinishReason.STOP),
        ({"stop_token_ids": [9]}, [5, 9, 5], 2, FinishReason.STOP),
        ({"stop_token_ids": [9], "min_tokens": 2}, [9, 9, 5], 2, FinishReason.STOP),
        ({"max_tokens": 2}, [5, 5, 5], 2, FinishReason.LENGTH),
        ({"max_tokens": 2}, [5, EOS, 5], 2, FinishReason.STOP),
    ],
)
def test_postprocess_finishes_with_the_right_reason(sampling, tokens, num_output, reason):
    scheduler = make_scheduler()
    seq = add(scheduler, "a", 3, **sampling)

    for token_id in tokens:
        if seq.is_finished:
            break
        step(scheduler, token_id)

    assert seq.finish_reason is reason
    assert seq.output_token_ids == tokens[:num_output]
    assert scheduler.block_manager.num_free_blocks == 64


def test_postprocess_stops_at_the_context_limit():
    scheduler = make_scheduler(max_model_len=8)
    seq = add(scheduler, "a", 6, max_tokens=100)

    step(scheduler)
    step(scheduler)

    assert seq.finish_reason is FinishReason.LENGTH
    assert seq.num_tokens == 8


def test_postprocess_rejects_a_wrong_number_of_tokens():
    scheduler = make_scheduler()
    add(scheduler, "a", 3)
    plan = scheduler.schedule()
    with pytest.raises(ValueError, match="got 0 tokens for 1 sequences"):
        scheduler.postprocess(plan, [])


def test_finished_and_aborted_sequences_return_every_block():
    scheduler = make_scheduler(num_kv_blocks=12, block_size=2, max_num_batched_tokens=8)
    for i in range(10):
        add(scheduler, f"r{i}", 1 + i % 4, base=100 * i, max_tokens=1 + i % 5)
    step(scheduler)
    scheduler.abort(RequestId("r0"))
    scheduler.abort(RequestId("r9"))

    while scheduler.has_unfinished():
        step(scheduler)

    assert scheduler.block_manager.num_free_blocks == 12
    assert scheduler.num_running == 0
    assert scheduler.num_waiting == 0


def test_scheduler_config_rejects_non_positive_limits():
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1"):
        SchedulerConfig(num_kv_blocks=4, max_num_seqs=0)
