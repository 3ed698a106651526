import ctypes
import math
import random
from typing import Any

import pytest

from proto.messages import (
    BlockHash,
    BlockRemoved,
    BlockStored,
    FinishReason,
    KVEvent,
    RequestId,
    SamplingParams,
)
from shared.engine.interface import Engine, EngineRequest, RequestOutput, prefill_sampling
from shared.engine.runner import KVRegion
from shared.engine.sim import SimEngine, SimEngineConfig, block_kv_bytes
from shared.engine.timing import TimingModel
from shared.errors import InvalidRequest, Overloaded
from shared.kv_hash import hash_block_tokens, hash_prompt_blocks

EOS = 2
BS = 4

Tokens = tuple[list[int], FinishReason | None]


def make_config(**overrides: Any) -> SimEngineConfig:
    config: dict[str, Any] = {
        "num_kv_blocks": 1024,
        "block_size": BS,
        "max_num_seqs": 64,
        "max_num_batched_tokens": 256,
        "max_model_len": 4096,
        "vocab_size": 1000,
        "eos_token_id": EOS,
        "mean_output_tokens": 16,
        "seed": 0,
    }
    config.update(overrides)
    return SimEngineConfig(**config)


def make_engine(**overrides: Any) -> SimEngine:
    return SimEngine(make_config(**overrides))


def request(
    request_id: str, token_ids: list[int], *, hold_kv: bool = False, **sampling: Any
) -> EngineRequest:
    return EngineRequest(
        RequestId(request_id), token_ids, SamplingParams(**sampling), hold_kv=hold_kv
    )


def prefill_request(req: EngineRequest) -> EngineRequest:
    """What a prefill worker runs for ``req``: one token, blocks held."""
    return EngineRequest(
        req.request_id, req.token_ids, prefill_sampling(req.sampling), hold_kv=True
    )


def region(engine: Engine) -> KVRegion:
    kv_region = engine.kv_region
    assert kv_region is not None
    return kv_region


def block_bytes(engine: Engine, block_ids: list[int]) -> list[bytes]:
    kv = region(engine)
    return [ctypes.string_at(kv.block_address(b), kv.block_bytes) for b in block_ids]


def expected_bytes(token_ids: list[int], num_tokens: int, size: int = 64) -> list[bytes]:
    """What any engine writes into the blocks holding the KV of ``token_ids[:num_tokens]``."""
    out = []
    parent: BlockHash | None = None
    for start in range(0, num_tokens, BS):
        chunk = token_ids[start : min(start + BS, num_tokens)]
        out.append(block_kv_bytes(parent, chunk, size))
        parent = hash_block_tokens(parent, chunk) if len(chunk) == BS else None
    return out


def transfer(src: Engine, src_block_ids: list[int], dst: Engine, dst_block_ids: list[int]) -> None:
    """A one-sided read, as a transfer agent does it: block by block, address to address."""
    src_kv, dst_kv = region(src), region(dst)
    assert src_kv.block_bytes == dst_kv.block_bytes
    for src_id, dst_id in zip(src_block_ids, dst_block_ids, strict=True):
        ctypes.memmove(
            dst_kv.block_address(dst_id), src_kv.block_address(src_id), src_kv.block_bytes
        )


def first_token(prefill: Engine, req: EngineRequest) -> int:
    prefill.add_request(prefill_request(req))
    (out,) = prefill.step().outputs
    assert out.finish_reason is not None
    return out.new_token_ids[0]


def run_alone(engine: Engine, req: EngineRequest) -> Tokens:
    engine.add_request(req)
    return run_steps(engine)


def run_steps(engine: Engine) -> Tokens:
    """Step until idle; the tokens and finish reason of the one request that ran."""
    tokens: list[int] = []
    reason = None
    while engine.has_unfinished():
        for out in engine.step().outputs:
            tokens.extend(out.new_token_ids)
            reason = out.finish_reason
    return tokens, reason


# --- prefill side: hold_kv -----------------------------------------------------------------------


def test_hold_kv_keeps_blocks_until_release():
    engine = make_engine()
    prompt = list(range(10, 20))
    engine.add_request(request("a", prompt, hold_kv=True, max_tokens=1))

    (out,) = engine.step().outputs

    assert out.finish_reason is FinishReason.LENGTH
    assert engine.held_blocks(RequestId("a")) == [0, 1, 2]
    assert not engine.has_unfinished()
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_held) == (0, 0, 1)
    assert stats.num_free_blocks == 1024 - 3
    hashes = hash_prompt_blocks(prompt, BS)
    assert engine.take_kv_events() == [BlockStored(block_hashes=hashes, parent_hash=None)]
    assert engine.runner.num_requests == 0

    assert engine.release(RequestId("a"))

    assert engine.stats().num_free_blocks == 1024
    assert engine.stats().num_held == 0
    bm = engine.scheduler.block_manager
    assert [bm.block_hash(i) for i in range(3)] == [*hashes, None]
    assert not engine.release(RequestId("a"))
    with pytest.raises(KeyError):
        engine.held_blocks(RequestId("a"))
    engine.add_request(request("b", prompt, max_tokens=1))
    assert engine.step().outputs[0].num_cached_tokens == 8


def test_held_blocks_hold_the_prompt_kv_and_no_output_blocks():
    engine = make_engine(mean_output_tokens=None)
    prompt = [7, 8, 9, 10, 11, 12]
    engine.add_request(request("a", prompt, hold_kv=True, max_tokens=5))
    while engine.has_unfinished():
        engine.step()

    held = engine.held_blocks(RequestId("a"))

    assert len(held) == 2
    seq = engine.scheduler.held[RequestId("a")]
    assert held == seq.block_table[:2]
    assert len(seq.block_table) == 3  # 6 prompt + 4 output tokens have KV
    assert block_bytes(engine, held) == expected_bytes(seq.token_ids, 8)
    assert engine.stats().num_free_blocks == 1024 - 3


def test_hold_kv_request_with_cached_prompt_holds_a_private_last_block():
    engine = make_engine()
    prompt = list(range(30, 38))  # two full blocks
    run_alone(engine, request("warm", prompt, max_tokens=1))
    engine.add_request(request("a", prompt, hold_kv=True, max_tokens=1))
    engine.step()

    held = engine.held_blocks(RequestId("a"))

    assert held[0] == 0  # the cached first block, shared
    assert held[1] != 1  # the last block was recomputed into a fresh one
    assert block_bytes(engine, held) == expected_bytes(prompt, 8)


# --- decode side: reserve and commit -------------------------------------------------------------


def test_reserve_reuses_the_cached_prefix():
    engine = make_engine()
    prefix = list(range(100, 112))
    run_alone(engine, request("warm", prefix, max_tokens=1))
    engine.take_kv_events()

    reservation = engine.reserve(request("a", [*prefix[:8], 5, 6, 7, 8, 9], max_tokens=10))

    assert reservation.num_cached_tokens == 8
    assert reservation.block_ids[:2] == [0, 1]
    assert len(reservation.block_ids) == 4
    assert not set(reservation.block_ids[2:]) & {0, 1, 2}
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_reserved) == (0, 0, 1)
    assert stats.num_free_blocks == 1024 - 4
    assert not engine.has_unfinished()
    assert engine.step().outputs == []
    assert engine.take_kv_events() == []  # nothing cached before the KV arrives


def test_reserve_shares_a_fully_cached_prompt_including_its_last_block():
    engine = make_engine()
    prompt = list(range(100, 112))
    run_alone(engine, request("warm", prompt, max_tokens=1))

    reservation = engine.reserve(request("a", prompt, max_tokens=10))

    assert reservation.num_cached_tokens == 12
    assert reservation.block_ids == [0, 1, 2]


def test_commit_caches_the_prompt_and_joins_the_batch():
    engine = make_engine(mean_output_tokens=None)
    prompt = list(range(10, 20))
    engine.reserve(request("a", prompt, max_tokens=4))

    assert engine.commit(RequestId("a"), 77) is None

    seq = engine.scheduler.get(RequestId("a"))
    assert seq is not None
    assert (seq.output_token_ids, seq.num_computed_tokens) == ([77], 10)
    assert engine.take_kv_events() == [
        BlockStored(block_hashes=hash_prompt_blocks(prompt, BS), parent_hash=None)
    ]
    stats = engine.stats()
    assert (stats.num_running, stats.num_reserved) == (1, 0)
    assert engine.has_unfinished()
    outputs = [out for _ in range(3) for out in engine.step().outputs]
    assert [len(out.new_token_ids) for out in outputs] == [1, 1, 1]
    assert outputs[-1].finish_reason is FinishReason.LENGTH
    assert engine.stats().num_free_blocks == 1024
    assert engine.runner.num_requests == 0


@pytest.mark.parametrize(
    ("sampling", "reason"),
    [
        ({"max_tokens": 1}, FinishReason.LENGTH),
        ({"max_tokens": 9}, FinishReason.STOP),  # the first token is EOS
        ({"max_tokens": 9, "stop_token_ids": [77]}, FinishReason.STOP),
    ],
)
def test_commit_finishes_at_once_when_the_first_token_ends_the_request(sampling, reason):
    engine = make_engine()
    engine.reserve(request("a", list(range(10, 19)), **sampling))
    token_id = 77 if "stop_token_ids" in sampling else EOS if sampling["max_tokens"] > 1 else 5

    out = engine.commit(RequestId("a"), token_id)

    assert out == RequestOutput(RequestId("a"), [], reason, 9, 0)
    assert not engine.has_unfinished()
    assert engine.stats().num_free_blocks == 1024
    assert engine.runner.num_requests == 0
    assert len(engine.take_kv_events()) == 1  # the two full prompt blocks were cached


def test_commit_respects_min_tokens_and_ignore_eos():
    engine = make_engine()
    engine.reserve(request("a", [5, 6, 7], min_tokens=2, max_tokens=9))
    engine.reserve(request("b", [5, 6, 8], ignore_eos=True, max_tokens=9))

    assert engine.commit(RequestId("a"), EOS) is None
    assert engine.commit(RequestId("b"), EOS) is None


def test_commit_rejects_unknown_requests_and_bad_tokens():
    engine = make_engine()
    with pytest.raises(KeyError):
        engine.commit(RequestId("nope"), 5)
    engine.reserve(request("a", [5, 6, 7]))
    with pytest.raises(InvalidRequest, match="token id 1000 is outside"):
        engine.commit(RequestId("a"), 1000)
    assert engine.stats().num_reserved == 1


def test_reserve_raises_overloaded_without_room_and_changes_nothing():
    engine = make_engine(num_kv_blocks=8, max_num_seqs=3)
    engine.reserve(request("a", list(range(10, 30)), max_tokens=1))  # 5 blocks

    with pytest.raises(Overloaded, match="cannot reserve 4 KV blocks"):
        engine.reserve(request("b", list(range(40, 53)), max_tokens=1))
    assert engine.stats().num_free_blocks == 3
    assert engine.stats().num_reserved == 1
    assert engine.runner.num_requests == 1
    engine.reserve(request("b", [40], max_tokens=1))
    engine.reserve(request("c", [41], max_tokens=1))
    with pytest.raises(Overloaded, match="3 sequences running or reserved"):
        engine.reserve(request("d", [42], max_tokens=1))


@pytest.mark.parametrize(
    ("token_ids", "sampling", "message"),
    [
        ([], {}, "prompt is empty"),
        ([5] * 90, {"max_tokens": 11}, "exceed max_model_len 100"),
        ([5, 1000], {}, "token id 1000 is outside"),
        ([5], {"min_tokens": 20}, "min_tokens must be in"),
    ],
)
def test_reserve_validates_as_add_request_does(token_ids, sampling, message):
    engine = make_engine(num_kv_blocks=10, max_model_len=100)

    with pytest.raises(InvalidRequest, match=message):
        engine.reserve(request("a", token_ids, **sampling))
    assert engine.stats().num_reserved == 0


def test_request_ids_are_unique_across_queued_reserved_and_held():
    engine = make_engine()
    engine.add_request(request("held", [5, 6], hold_kv=True, max_tokens=1))
    engine.step()
    engine.reserve(request("reserved", [5, 6]))

    for name in ("held", "reserved"):
        with pytest.raises(InvalidRequest, match="already running"):
            engine.add_request(request(name, [7]))
        with pytest.raises(InvalidRequest, match="already running"):
            engine.reserve(request(name, [7]))


def test_abort_frees_reserved_and_held_requests():
    engine = make_engine()
    engine.add_request(request("held", list(range(10, 19)), hold_kv=True, max_tokens=1))
    engine.step()
    engine.reserve(request("reserved", list(range(40, 49))))
    assert engine.stats().num_free_blocks == 1024 - 6

    assert engine.abort(RequestId("held"))
    assert engine.abort(RequestId("reserved"))

    stats = engine.stats()
    assert (stats.num_free_blocks, stats.num_held, stats.num_reserved) == (1024, 0, 0)
    assert not engine.abort(RequestId("held"))
    assert not engine.abort(RequestId("reserved"))
    assert engine.runner.num_requests == 0
    with pytest.raises(KeyError):
        engine.commit(RequestId("reserved"), 5)


# --- the whole hand-off --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "sampling"),
    [
        ({}, {"temperature": 0.0, "max_tokens": 40}),
        ({}, {"seed": 7, "max_tokens": 40}),
        ({}, {"max_tokens": 40}),
        ({"mean_output_tokens": None}, {"seed": 3, "stop_token_ids": [500], "max_tokens": 40}),
        ({"mean_output_tokens": 1}, {"min_tokens": 3, "max_tokens": 40}),  # EOS right at 3
        ({"mean_output_tokens": 1}, {"min_tokens": 1, "max_tokens": 40}),  # EOS first
        ({"mean_output_tokens": 1}, {"ignore_eos": True, "max_tokens": 12}),
    ],
)
def test_disaggregated_run_matches_one_engine_token_for_token_and_byte_for_byte(config, sampling):
    prompt = [(37 * i) % 997 + 3 for i in range(23)]
    req = request("r", prompt, **sampling)
    alone, prefill, decode = (make_engine(**config) for _ in range(3))
    alone.add_request(req)
    (out,) = alone.step().outputs
    expected_tokens, expected_reason = out.new_token_ids, out.finish_reason

    token_id = first_token(prefill, req)
    reservation = decode.reserve(req)
    transfer(prefill, prefill.held_blocks(req.request_id), decode, reservation.block_ids)
    prefill.release(req.request_id)
    assert token_id == expected_tokens[0]
    assert block_bytes(decode, reservation.block_ids) == expected_bytes(prompt, len(prompt))

    commit_out = decode.commit(req.request_id, token_id)
    tokens = [token_id]
    reason = commit_out.finish_reason if commit_out else None
    while decode.has_unfinished():
        (a,) = alone.step().outputs
        (d,) = decode.step().outputs
        assert d == a
        tokens.extend(d.new_token_ids)
        expected_tokens.extend(a.new_token_ids)
        reason, expected_reason = d.finish_reason, a.finish_reason
        if reason is None:
            a_seq = alone.scheduler.get(req.request_id)
            d_seq = decode.scheduler.get(req.request_id)
            assert a_seq is not None
            assert d_seq is not None
            assert block_bytes(decode, d_seq.block_table) == block_bytes(alone, a_seq.block_table)

    assert not alone.has_unfinished()
    assert (tokens, reason) == (expected_tokens, expected_reason)
    assert len(tokens) > 1 or reason is FinishReason.STOP


def test_disaggregated_run_with_a_prefix_cached_on_the_decode_side():
    prefix = list(range(200, 212))
    req = request("r", [*prefix, 5, 6, 7], temperature=0.0, max_tokens=20)
    alone, prefill, decode = make_engine(), make_engine(), make_engine()
    run_alone(decode, request("warm", prefix, max_tokens=1))
    expected = run_alone(alone, req)

    token_id = first_token(prefill, req)
    reservation = decode.reserve(req)
    assert reservation.num_cached_tokens == 12
    transfer(prefill, prefill.held_blocks(req.request_id)[3:], decode, reservation.block_ids[3:])
    assert block_bytes(decode, reservation.block_ids) == expected_bytes(req.token_ids, 15)
    assert decode.commit(req.request_id, token_id) is None
    tokens, reason = run_steps(decode)

    assert ([token_id, *tokens], reason) == expected


def replay(events: list[KVEvent], cached: set[BlockHash]) -> None:
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


def test_random_disaggregated_load_with_aborts_leaks_nothing_and_matches_one_engine():
    rng = random.Random(11)
    prefixes = [[rng.randrange(10, 1000) for _ in range(rng.randrange(4, 24))] for _ in range(8)]
    requests = []
    for i in range(2000):
        prompt = rng.choice(prefixes) + [rng.randrange(10, 1000) for _ in range(rng.randrange(8))]
        sampling: dict[str, Any] = {"max_tokens": rng.randrange(1, 40)}
        if i % 3 == 0:
            sampling["temperature"] = 0.0
        elif i % 3 == 1:
            sampling["seed"] = rng.randrange(100)
        sampling["min_tokens"] = rng.choice([0, 0, 1, 2, 5])
        sampling["min_tokens"] = min(sampling["min_tokens"], sampling["max_tokens"])
        requests.append(request(f"r{i}", prompt, **sampling))
    alone = make_engine(num_kv_blocks=4096, max_num_seqs=256)
    expected = {req.request_id: run_alone(alone, req) for req in requests[:300]}
    prefill = make_engine(num_kv_blocks=96, max_num_seqs=32, max_num_batched_tokens=48)
    decode = make_engine(num_kv_blocks=64, max_num_seqs=24)
    by_id = {req.request_id: req for req in requests}
    pending = list(reversed(requests))
    to_reserve: list[RequestId] = []  # held on the prefill side, waiting for room
    in_flight: list[tuple[RequestId, int]] = []  # reserved, KV moved, not committed yet
    first: dict[RequestId, int] = {}
    live: set[RequestId] = set()
    results: dict[RequestId, Tokens] = {}
    cached_p: set[BlockHash] = set()
    cached_d: set[BlockHash] = set()
    aborted = {"prefill": 0, "held": 0, "reserved": 0, "decode": 0}

    doomed: dict[int, list[RequestId]] = {}
    iteration = 0
    while pending or live:
        iteration += 1
        for _ in range(rng.randrange(6)):
            if pending:
                req = pending.pop()
                prefill.add_request(prefill_request(req))
                live.add(req.request_id)
                if rng.random() < 0.3:  # abort it a little later, wherever it is by then
                    doomed.setdefault(iteration + rng.randrange(12), []).append(req.request_id)
        for victim in doomed.pop(iteration, []):
            if victim not in live:
                continue
            if victim in prefill.scheduler.held:
                role = "held"
            elif prefill.scheduler.get(victim) is not None:
                role = "prefill"
            elif victim in decode.scheduler.reserved:
                role = "reserved"
            else:
                role = "decode"
            assert prefill.abort(victim) != decode.abort(victim)  # on exactly one engine
            aborted[role] += 1
            live.discard(victim)
            to_reserve = [rid for rid in to_reserve if rid != victim]
            in_flight = [(rid, t) for rid, t in in_flight if rid != victim]
        for out in prefill.step().outputs:
            if out.finish_reason is not None:
                first[out.request_id] = out.new_token_ids[0]
                to_reserve.append(out.request_id)
        still_waiting = []
        for rid in to_reserve:
            try:
                reservation = decode.reserve(by_id[rid])
            except Overloaded:
                still_waiting.append(rid)
                continue
            skip = reservation.num_cached_tokens // BS
            held = prefill.held_blocks(rid)
            transfer(prefill, held[skip:], decode, reservation.block_ids[skip:])
            assert prefill.release(rid)
            in_flight.append((rid, first[rid]))
        to_reserve = still_waiting
        rng.shuffle(in_flight)
        num_commit = rng.randrange(len(in_flight) + 1)
        for rid, token_id in in_flight[:num_commit]:
            seq = decode.scheduler.reserved[rid]
            assert block_bytes(decode, seq.block_table) == expected_bytes(
                seq.token_ids, seq.num_prompt_tokens
            )
            results[rid] = ([token_id], None)
            finishing = decode.commit(rid, token_id)
            if finishing is not None:
                results[rid] = ([token_id], finishing.finish_reason)
                live.discard(rid)
        in_flight = in_flight[num_commit:]
        for out in decode.step().outputs:
            tokens, _ = results[out.request_id]
            tokens.extend(out.new_token_ids)
            results[out.request_id] = (tokens, out.finish_reason)
            if out.finish_reason is not None:
                live.discard(out.request_id)
        replay(prefill.take_kv_events(), cached_p)
        replay(decode.take_kv_events(), cached_d)

    for engine, cached in ((prefill, cached_p), (decode, cached_d)):
        stats = engine.stats()
        assert (stats.num_running, stats.num_waiting, stats.num_reserved, stats.num_held) == (
            0,
            0,
            0,
            0,
        )
        assert stats.num_free_blocks == stats.num_total_blocks
        assert engine.runner.num_requests == 0
        bm = engine.scheduler.block_manager
        assert cached == {bm.block_hash(i) for i in range(bm.num_blocks)} - {None}
    assert min(aborted.values()) > 40
    assert sum(aborted.values()) > 450
    assert decode.scheduler.num_preemptions > 0
    finished = {rid: out for rid, out in results.items() if out[1] is not None}
    assert len(finished) > 1000
    compared = [rid for rid in finished if rid in expected]
    assert len(compared) > 150
    for rid in compared:
        assert finished[rid] == expected[rid]


# --- KV memory and modelled transfer time --------------------------------------------------------


def test_sim_runner_uses_a_caller_supplied_kv_buffer():
    buffer = bytearray(16 * 64 + 10)
    view = memoryview(buffer)
    engine = SimEngine(make_config(num_kv_blocks=16), kv_buffer=view)

    kv = region(engine)
    assert kv == KVRegion(ctypes.addressof(ctypes.c_char.from_buffer(buffer)), 16, 64)
    run_alone(engine, request("a", [5, 6, 7, 8, 9], max_tokens=1))
    assert bytes(buffer[:64]) == expected_bytes([5, 6, 7, 8], 4)[0]
    assert bytes(buffer[64:128]) == expected_bytes([5, 6, 7, 8, 9], 5)[1]
    with pytest.raises(ValueError, match="needs 1024"):
        SimEngine(make_config(num_kv_blocks=16), kv_buffer=memoryview(bytearray(1000)))
    with pytest.raises(ValueError, match="writable"):
        SimEngine(make_config(num_kv_blocks=16), kv_buffer=memoryview(bytes(1024)))


def test_kv_block_bytes_zero_means_no_kv_region():
    engine = make_engine(kv_block_bytes=0)

    assert engine.kv_region is None
    assert run_alone(engine, request("a", [5, 6, 7], max_tokens=3))[1] is not None


def test_transfer_time_prices_real_bytes_as_modelled_blocks():
    config = make_config()
    engine = SimEngine(config)

    assert config.kv_bytes_per_block_modelled == 458_752
    # Ten of the runner's real blocks stand for ten blocks of the modelled model.
    assert engine.transfer_time_s(10 * config.kv_block_bytes) == pytest.approx(
        config.timing.transfer_ms(10 * 458_752) / 1000
    )
    assert engine.transfer_time_s(0) == 0.0


def test_held_request_output_lists_its_prompt_blocks():
    engine = make_engine()
    engine.add_request(prefill_request(request("a", list(range(1, 11)), max_tokens=5)))
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step().outputs)

    (out,) = outputs
    assert out.finish_reason is not None
    assert out.held_block_ids == engine.held_blocks(RequestId("a"))


def test_prefill_sampling_asks_for_one_token_sampled_as_the_first():
    sampling = SamplingParams(max_tokens=50, min_tokens=5, seed=3, stop_token_ids=[9])

    assert prefill_sampling(sampling) == SamplingParams(
        max_tokens=1, min_tokens=1, seed=3, stop_token_ids=[9], ignore_eos=True
    )
    assert prefill_sampling(SamplingParams(min_tokens=1)) == SamplingParams(
        max_tokens=1, min_tokens=1
    )


def test_cached_prefix_and_hashes_reflect_the_prefix_cache():
    engine = SimEngine(
        SimEngineConfig(
            num_kv_blocks=64,
            block_size=4,
            mean_output_tokens=None,
            timing=TimingModel(speedup=math.inf),
        )
    )
    prompt = list(range(1, 11))  # two full blocks and a partial one
    assert engine.cached_prefix_tokens(prompt) == 0
    engine.add_request(EngineRequest(RequestId("a"), prompt, SamplingParams(max_tokens=1)))
    while engine.has_unfinished():
        engine.step()
    assert engine.cached_prefix_tokens(prompt) == 8
    assert engine.cached_prefix_tokens([*prompt[:4], 99, 98, 97, 96]) == 4
    assert set(engine.cached_block_hashes()) == set(hash_prompt_blocks(prompt, 4))
