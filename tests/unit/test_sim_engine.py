import random
from typing import Any

import pytest

from proto.messages import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    FinishReason,
    KVEvent,
    RequestId,
    SamplingParams,
)
from shared.engine.interface import Engine, EngineRequest
from shared.engine.sim import SimEngine, SimEngineConfig
from shared.errors import InvalidRequest
from shared.kv_hash import hash_block_tokens

EOS = 2

Outputs = dict[str, tuple[list[int], FinishReason | None]]


def make_engine(**overrides: Any) -> SimEngine:
    config: dict[str, Any] = {
        "num_kv_blocks": 1024,
        "block_size": 4,
        "max_num_seqs": 64,
        "max_num_batched_tokens": 256,
        "max_model_len": 4096,
        "vocab_size": 1000,
        "eos_token_id": EOS,
        "mean_output_tokens": 16,
        "seed": 0,
    }
    config.update(overrides)
    return SimEngine(SimEngineConfig(**config))


def request(request_id: str, token_ids: list[int], **sampling: Any) -> EngineRequest:
    return EngineRequest(RequestId(request_id), token_ids, SamplingParams(**sampling))


def run_to_completion(engine: SimEngine, requests: list[EngineRequest]) -> Outputs:
    for req in requests:
        engine.add_request(req)
    outputs: Outputs = {req.request_id: ([], None) for req in requests}
    while engine.has_unfinished():
        for out in engine.step().outputs:
            tokens, _ = outputs[out.request_id]
            tokens.extend(out.new_token_ids)
            outputs[out.request_id] = (tokens, out.finish_reason)
    return outputs


def mixed_requests(count: int, seed: int) -> list[EngineRequest]:
    rng = random.Random(seed)
    shared_prefix = [rng.randrange(10, 1000) for _ in range(12)]
    requests = []
    for i in range(count):
        prompt = [rng.randrange(10, 1000) for _ in range(rng.randrange(1, 40))]
        if i % 3 == 0:
            prompt = shared_prefix + prompt
        sampling: dict[str, object] = {"max_tokens": rng.randrange(1, 40)}
        if i % 4 == 0:
            sampling["temperature"] = 0.0
        elif i % 4 == 1:
            sampling["seed"] = rng.randrange(100)
        requests.append(request(f"req-{i}", prompt, **sampling))
    return requests


def test_sim_engine_satisfies_the_engine_protocol():
    engine: Engine = make_engine()

    assert engine.block_size == 4
    assert engine.max_model_len == 4096


def test_same_requests_twice_produce_identical_tokens():
    first = run_to_completion(make_engine(), mixed_requests(60, seed=1))
    second = run_to_completion(make_engine(), mixed_requests(60, seed=1))

    assert first == second
    assert all(reason is not None for _, reason in first.values())


def test_tokens_are_fixed_across_processes():
    # Computed once in another process: nothing may depend on hash() salting or run order.
    engine = make_engine(output_token_ids=(10, 11, 12, 13, 14, 15, 16, 17), mean_output_tokens=None)
    outputs = run_to_completion(
        engine,
        [
            request("greedy", [5, 6, 7], temperature=0.0, max_tokens=8),
            request("seeded", [5, 6, 7], seed=42, max_tokens=8),
            request("random", [5, 6, 7], max_tokens=8),
        ],
    )

    assert outputs == {
        "greedy": ([12, 12, 14, 10, 12, 16, 17, 11], FinishReason.LENGTH),
        "seeded": ([16, 13, 12, 14, 14, 16, 11, 11], FinishReason.LENGTH),
        "random": ([13, 14, 17, 13, 12, 11, 16, 14], FinishReason.LENGTH),
    }


def test_greedy_output_depends_only_on_the_prompt():
    prompt = [11, 12, 13, 14, 15]
    engine = make_engine(mean_output_tokens=None)
    outputs = run_to_completion(
        engine,
        [
            request("a", prompt, temperature=0.0, max_tokens=10),
            request("other", [99, 98], temperature=0.0, max_tokens=5),
            request("b", prompt, temperature=0.0, max_tokens=10, seed=7),
        ],
    )

    assert outputs["a"] == outputs["b"]
    assert outputs["a"] != outputs["other"]


def test_seeded_output_follows_the_seed_not_the_request_id():
    prompt = [21, 22, 23]
    outputs = run_to_completion(
        make_engine(mean_output_tokens=None),
        [
            request("a", prompt, seed=1, max_tokens=12),
            request("b", prompt, seed=1, max_tokens=12),
            request("c", prompt, seed=2, max_tokens=12),
        ],
    )

    assert outputs["a"] == outputs["b"]
    assert outputs["a"] != outputs["c"]


def test_unseeded_sampling_differs_by_request_id():
    prompt = [21, 22, 23]
    outputs = run_to_completion(
        make_engine(mean_output_tokens=None),
        [request("a", prompt, max_tokens=12), request("b", prompt, max_tokens=12)],
    )

    assert outputs["a"] != outputs["b"]


def test_preemption_does_not_change_output():
    roomy = make_engine()
    cramped = make_engine(num_kv_blocks=24)

    expected = run_to_completion(roomy, mixed_requests(80, seed=2))
    actual = run_to_completion(cramped, mixed_requests(80, seed=2))

    assert roomy.scheduler.num_preemptions == 0
    assert cramped.scheduler.num_preemptions > 0
    assert actual == expected


def test_natural_length_is_geometric_with_the_configured_mean():
    rng = random.Random(3)
    requests = [
        request(f"r{i}", [rng.randrange(10, 1000) for _ in range(8)], max_tokens=1000)
        for i in range(2000)
    ]
    outputs = run_to_completion(
        make_engine(mean_output_tokens=20, max_num_seqs=512, num_kv_blocks=20000), requests
    )

    lengths = [len(tokens) for tokens, _ in outputs.values()]
    assert 19.0 < sum(lengths) / len(lengths) < 21.0
    assert min(lengths) == 1
    for tokens, reason in outputs.values():
        assert reason is FinishReason.STOP
        assert tokens[-1] == EOS
        assert EOS not in tokens[:-1]


def test_ignore_eos_runs_to_max_tokens():
    outputs = run_to_completion(
        make_engine(mean_output_tokens=1), [request("a", [5, 6], ignore_eos=True, max_tokens=30)]
    )

    tokens, reason = outputs["a"]
    assert reason is FinishReason.LENGTH
    assert len(tokens) == 30
    assert EOS not in tokens


def test_min_tokens_delays_eos():
    outputs = run_to_completion(
        make_engine(mean_output_tokens=1), [request("a", [5, 6], min_tokens=5, max_tokens=30)]
    )

    tokens, reason = outputs["a"]
    assert reason is FinishReason.STOP
    assert len(tokens) == 5
    assert tokens[-1] == EOS


def test_stop_tokens_are_not_sampled_before_min_tokens():
    engine = make_engine(output_token_ids=(10, 11), mean_output_tokens=None)
    outputs = run_to_completion(
        engine, [request("a", [5], stop_token_ids=[10], min_tokens=4, max_tokens=100)]
    )

    tokens, reason = outputs["a"]
    assert tokens[:4] == [11, 11, 11, 11]
    assert reason is FinishReason.STOP
    assert tokens[-1] == 10


def test_emitted_tokens_come_from_output_token_ids_or_eos():
    allowed = {100, 200, 300, EOS}
    outputs = run_to_completion(
        make_engine(output_token_ids=[100, 200, 300]), mixed_requests(30, seed=4)
    )

    assert all(set(tokens) <= allowed for tokens, _ in outputs.values())


@pytest.mark.parametrize(
    ("token_ids", "sampling", "message"),
    [
        ([], {}, "prompt is empty"),
        ([5] * 90, {"max_tokens": 11}, "exceed max_model_len 100"),
        ([5] * 30, {"max_tokens": 12}, "needs 11 KV blocks; the cache has 10"),
        ([5, 1000], {}, "token id 1000 is outside"),
        ([-1, 5], {}, "token id -1 is outside"),
        ([5], {"max_tokens": 0}, "max_tokens must be >= 1"),
        ([5], {"min_tokens": 20}, "min_tokens must be in"),
        ([5], {"temperature": -0.5}, "temperature must be >= 0"),
        ([5], {"temperature": float("nan")}, "temperature must be >= 0"),
        ([5], {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ([5], {"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ([5], {"top_p": float("nan")}, r"top_p must be in \(0, 1\]"),
    ],
)
def test_add_request_rejects_requests_that_can_never_run(token_ids, sampling, message):
    engine = make_engine(num_kv_blocks=10, max_model_len=100)

    with pytest.raises(InvalidRequest, match=message):
        engine.add_request(request("a", token_ids, **sampling))
    assert not engine.has_unfinished()


def test_add_request_rejects_a_duplicate_request_id():
    engine = make_engine()
    engine.add_request(request("a", [5]))

    with pytest.raises(InvalidRequest, match="already running"):
        engine.add_request(request("a", [6]))


def test_step_duration_follows_the_timing_model():
    engine = make_engine(mean_output_tokens=None)
    timing = engine.config.timing
    engine.add_request(request("a", [5] * 10, max_tokens=50))
    engine.add_request(request("b", [6] * 20, max_tokens=50))

    prefill = engine.step()
    decode = engine.step()

    assert prefill.num_prefill_tokens == 30
    assert prefill.num_decode_tokens == 0
    assert prefill.duration_s == pytest.approx(timing.prefill_batch_ms([10, 20]) / 1000)
    assert decode.num_prefill_tokens == 0
    assert decode.num_decode_tokens == 2
    kv_usage = engine.stats().kv_usage
    assert kv_usage == pytest.approx(9 / 1024)
    assert decode.duration_s == pytest.approx(timing.decode_ms(2, kv_usage) / 1000)


def test_idle_step_returns_nothing():
    result = make_engine().step()

    assert result.outputs == []
    assert result.duration_s == 0.0


def test_outputs_report_prompt_and_cached_tokens():
    engine = make_engine(mean_output_tokens=None)
    engine.add_request(request("a", list(range(10, 19)), max_tokens=3))
    first = engine.step().outputs
    engine.add_request(request("b", list(range(10, 19)), max_tokens=3))
    second = engine.step().outputs

    assert [(o.request_id, o.num_prompt_tokens, o.num_cached_tokens) for o in first] == [
        ("a", 9, 0)
    ]
    assert [(o.request_id, o.num_cached_tokens) for o in second] == [("b", 8), ("a", 0)]


def test_take_kv_events_reports_stored_prompt_blocks():
    engine = make_engine()
    engine.add_request(request("a", [10, 11, 12, 13, 14, 15, 16, 17, 18]))
    engine.step()
    first = hash_block_tokens(None, [10, 11, 12, 13])

    assert engine.take_kv_events() == [
        BlockStored(
            block_hashes=[first, hash_block_tokens(first, [14, 15, 16, 17])], parent_hash=None
        )
    ]
    assert engine.take_kv_events() == []


def test_abort_frees_blocks_and_reports_whether_known():
    engine = make_engine()
    engine.add_request(request("a", [5] * 9))
    engine.add_request(request("b", [6] * 9))
    engine.step()
    engine.add_request(request("c", [7] * 9))

    assert engine.abort(RequestId("a"))
    assert engine.abort(RequestId("c"))
    assert not engine.abort(RequestId("a"))
    assert not engine.abort(RequestId("unknown"))
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting) == (1, 0)
    assert stats.num_free_blocks == 1024 - 3


def replay(events: list[KVEvent], cached: set[BlockHash]) -> None:
    """Apply KV events as a router would, checking they are consistent."""
    for event in events:
        match event:
            case BlockStored(block_hashes=hashes, parent_hash=parent):
                assert parent is None or parent in cached
                for block_hash in hashes:
                    assert block_hash not in cached
                    cached.add(block_hash)
            case BlockRemoved(block_hashes=hashes):
                for block_hash in hashes:
                    cached.remove(block_hash)
            case AllBlocksCleared():
                cached.clear()


def test_random_load_with_aborts_leaks_no_blocks_and_keeps_events_consistent():
    rng = random.Random(5)
    engine = make_engine(num_kv_blocks=96, max_num_seqs=48, max_num_batched_tokens=128)
    prefixes = [[rng.randrange(10, 1000) for _ in range(rng.randrange(4, 24))] for _ in range(8)]
    pending = []
    for i in range(2000):
        prompt = rng.choice(prefixes) + [rng.randrange(10, 1000) for _ in range(rng.randrange(8))]
        pending.append(request(f"r{i}", prompt, max_tokens=rng.randrange(1, 48)))
    pending.reverse()
    live: set[str] = set()
    cached: set[BlockHash] = set()
    num_aborted = 0
    while pending or engine.has_unfinished():
        for _ in range(rng.randrange(6)):
            if pending:
                req = pending.pop()
                engine.add_request(req)
                live.add(req.request_id)
        if live and rng.random() < 0.3:
            victim = rng.choice(sorted(live))
            assert engine.abort(RequestId(victim))
            live.discard(victim)
            num_aborted += 1
        for out in engine.step().outputs:
            if out.finish_reason is not None:
                live.remove(out.request_id)
        replay(engine.take_kv_events(), cached)

    bm = engine.scheduler.block_manager
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.num_free_blocks == stats.num_total_blocks == 96
    assert not live
    assert num_aborted > 100
    assert engine.scheduler.num_preemptions > 0
    assert cached == {bm.block_hash(i) for i in range(96)} - {None}
    assert engine.runner.num_requests == 0


def test_config_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="eos_token_id"):
        SimEngineConfig(vocab_size=10, eos_token_id=10)
    with pytest.raises(ValueError, match="output_token_ids must lie"):
        SimEngineConfig(vocab_size=10, output_token_ids=(3, 10))
    with pytest.raises(ValueError, match="other than eos_token_id"):
        SimEngineConfig(vocab_size=10, eos_token_id=2, output_token_ids=(2,))
    with pytest.raises(ValueError, match="mean_output_tokens"):
        SimEngineConfig(mean_output_tokens=0.5)
    with pytest.raises(ValueError, match="max_num_seqs"):
        SimEngineConfig(max_num_seqs=0)


def test_each_output_counts_the_tokens_so_far_resumed_ones_included():
    engine = make_engine()
    engine.add_request(request("fresh", [11, 12, 13], max_tokens=5, ignore_eos=True))
    engine.add_request(
        EngineRequest(
            RequestId("resumed"),
            [11, 12, 13],
            SamplingParams(max_tokens=5, ignore_eos=True),
            resumed_token_ids=[40, 41],
        )
    )
    counts: dict[str, list[int]] = {"fresh": [], "resumed": []}
    while engine.has_unfinished():
        for out in engine.step().outputs:
            if out.new_token_ids:
                counts[out.request_id].append(out.num_output_tokens)
    assert counts == {"fresh": [1, 2, 3, 4, 5], "resumed": [3, 4, 5]}
