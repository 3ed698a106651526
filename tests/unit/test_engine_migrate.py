"""Live migration between two engines: one detaches a decoding sequence and holds its KV, the
other reserves blocks, reads them and resumes it; the tokens and KV bytes are what one engine
alone produces."""

import random

import pytest

from proto.messages import RequestId, SamplingParams
from shared.engine.interface import Engine, EngineRequest
from tests.unit.test_engine_disagg import (
    BS,
    block_bytes,
    expected_bytes,
    make_engine,
    request,
    run_alone,
    run_steps,
    transfer,
)


def decode_steps(engine: Engine, num_steps: int) -> list[int]:
    """Step ``num_steps`` times; the tokens of the one request running."""
    tokens = []
    for _ in range(num_steps):
        for out in engine.step().outputs:
            tokens.extend(out.new_token_ids)
    return tokens


def move(src: Engine, dst: Engine, req: EngineRequest, emitted: list[int]) -> int:
    """Detach ``req`` on ``src``, move its KV to ``dst`` and resume it there; the blocks that
    moved."""
    block_ids, num_kv_tokens = src.detach(req.request_id)
    assert num_kv_tokens == len(req.token_ids) + len(emitted) - 1
    moved = EngineRequest(
        RequestId(f"{req.request_id}-2"), req.token_ids, req.sampling, resumed_token_ids=emitted
    )
    reservation = dst.reserve(moved, is_moved=True)
    assert len(reservation.block_ids) == len(block_ids)
    first = reservation.num_cached_tokens // BS
    transfer(src, block_ids[first:], dst, reservation.block_ids[first:])
    dst.resume(moved.request_id)
    assert src.release(req.request_id)
    return len(block_ids) - first


@pytest.mark.parametrize(
    "sampling",
    [
        {"max_tokens": 40, "temperature": 0.0, "ignore_eos": True},
        {"max_tokens": 40, "temperature": 1.0, "seed": 7},
        {"max_tokens": 23, "temperature": 0.0, "ignore_eos": True},
    ],
)
@pytest.mark.parametrize("prompt_len", [13, 16, 17])
@pytest.mark.parametrize("num_steps", [1, 3, 4, 12])
def test_moved_sequence_continues_token_for_token_and_byte_for_byte(
    sampling, prompt_len, num_steps
):
    prompt = [random.Random(prompt_len).randrange(10, 900) for _ in range(prompt_len)]
    alone, alone_reason = run_alone(make_engine(), request("a", prompt, **sampling))

    src, dst = make_engine(), make_engine()
    req = request("r", prompt, **sampling)
    src.add_request(req)
    emitted = decode_steps(src, num_steps)
    assert emitted == alone[:num_steps]
    if len(emitted) == len(alone):
        return  # it finished first: nothing left to move
    move(src, dst, req, emitted)
    assert src.stats().num_free_blocks == src.stats().num_total_blocks  # all released
    rest, reason = run_steps(dst)
    assert emitted + rest == alone
    assert reason is alone_reason


def test_moved_kv_bytes_are_what_the_new_engine_would_compute():
    prompt = list(range(100, 118))  # 18 tokens: 4 full blocks and a partial one
    src, dst = make_engine(), make_engine()
    req = request("r", prompt, max_tokens=30, temperature=0.0, ignore_eos=True)
    src.add_request(req)
    emitted = decode_steps(src, 5)
    block_ids, num_kv_tokens = src.detach(req.request_id)
    tokens = prompt + emitted
    assert block_bytes(src, block_ids) == expected_bytes(tokens, num_kv_tokens)
    moved = EngineRequest(RequestId("m"), prompt, req.sampling, resumed_token_ids=emitted)
    reservation = dst.reserve(moved, is_moved=True)
    transfer(src, block_ids, dst, reservation.block_ids)
    dst.resume(moved.request_id)
    dst.step()  # computes the newest token's KV and samples the next
    seq = dst.scheduler.get(moved.request_id)
    assert seq is not None
    tokens = list(seq.token_ids)
    # What a peer reads when it moves on again (a decode writes its block once full; the
    # part-filled one when the KV is about to be read).
    block_ids, num_kv_tokens = dst.detach(moved.request_id)
    assert num_kv_tokens == len(tokens) - 1
    assert block_bytes(dst, block_ids) == expected_bytes(tokens, num_kv_tokens)


@pytest.mark.parametrize("num_steps", [3, 4, 5, 20])
def test_decodes_write_a_block_once_full(num_steps):
    prompt = list(range(300, 306))  # 6 tokens: one full block and a part
    engine = make_engine()
    req = request("r", prompt, max_tokens=40, temperature=0.0, ignore_eos=True)
    engine.add_request(req)
    decode_steps(engine, num_steps)
    seq = engine.scheduler.get(req.request_id)
    assert seq is not None
    num_full = seq.num_computed_tokens // BS
    full = seq.block_table[:num_full]
    assert block_bytes(engine, full) == expected_bytes(seq.token_ids, num_full * BS)


def test_moved_sequence_reuses_the_prefix_the_new_engine_caches():
    prompt = list(range(200, 233))  # 33 tokens: 8 full blocks
    sampling = {"max_tokens": 20, "temperature": 0.0, "ignore_eos": True}
    dst = make_engine()
    run_alone(dst, request("warm", prompt, **{**sampling, "max_tokens": 2}))
    src = make_engine()
    req = request("r", prompt, **sampling)
    src.add_request(req)
    emitted = decode_steps(src, 6)
    moved_blocks = move(src, dst, req, emitted)
    assert moved_blocks == 10 - 8  # 38 tokens of KV: 10 blocks, 8 cached there already
    rest, _ = run_steps(dst)
    alone, _ = run_alone(make_engine(), request("a", prompt, **sampling))
    assert emitted + rest == alone


def test_detach_refuses_what_is_not_running_and_holds_until_release():
    engine = make_engine(max_num_seqs=1)
    req = request("r", list(range(300, 330)), max_tokens=10, temperature=0.0, ignore_eos=True)
    queued = request("q", list(range(400, 410)), max_tokens=10)
    with pytest.raises(KeyError):
        engine.detach(req.request_id)  # unknown
    engine.add_request(req)
    engine.add_request(queued)
    engine.step()  # r prefills; q waits for a batch slot
    with pytest.raises(KeyError):
        engine.detach(queued.request_id)  # waiting: it has no KV to give
    total = engine.stats().num_total_blocks
    block_ids, num_kv_tokens = engine.detach(req.request_id)
    assert num_kv_tokens == 30
    assert len(block_ids) == 8
    assert engine.stats().num_held == 1
    assert engine.stats().num_free_blocks == total - 8
    assert engine.release(req.request_id)
    assert engine.stats().num_free_blocks == total
    engine.step()  # the slot it left lets q in
    assert engine.stats().num_running == 1


def test_resume_refuses_what_was_not_reserved():
    engine = make_engine()
    with pytest.raises(KeyError):
        engine.resume(RequestId("nobody"))


def test_a_reserved_move_can_be_aborted_and_frees_its_blocks():
    engine = make_engine()
    total = engine.stats().num_total_blocks
    moved = EngineRequest(
        RequestId("m"), list(range(40)), SamplingParams(max_tokens=9), resumed_token_ids=[5, 6]
    )
    engine.reserve(moved, is_moved=True)
    assert engine.stats().num_free_blocks < total
    assert engine.abort(moved.request_id)
    assert engine.stats().num_free_blocks == total
