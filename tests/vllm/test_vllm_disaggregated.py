"""Disaggregated prefill and decode between two in-process vLLM engines (CPU, tiny random
Llama): hold on one, reserve on the other, one-sided reads through real tcp transfer agents,
commit; the greedy tokens must be those of one engine serving the request alone."""

import asyncio
import contextlib

import pytest

pytest.importorskip("vllm")

from proto.messages import FinishReason, InstanceId, RequestId, SamplingParams
from shared.engine.config import EngineConfig
from shared.engine.factory import BuiltEngine, build_engine
from shared.engine.interface import EngineRequest, prefill_sampling
from shared.engine.kv_connector import KVSource
from shared.errors import InvalidRequest, Overloaded
from shared.kv_transfer import create_agent
from shared.tokenizer import Tokenizer

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning"),
]

CONFIG = EngineConfig(engine="vllm", num_kv_blocks=256, max_model_len=512, max_num_seqs=8)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engines():
    """A prefill and a decode engine, each with its tcp agent and its Baton connector."""
    tokenizer = Tokenizer.load("builtin")
    with contextlib.ExitStack() as stack:
        pair = []
        for name in ("prefill", "decode"):
            built: BuiltEngine = build_engine(CONFIG, tokenizer)
            stack.callback(built.engine.close)
            agent = stack.enter_context(create_agent("tcp", InstanceId(f"vllm-{name}")))
            assert built.make_connector is not None
            pair.append((built.engine, agent, built.make_connector(agent)))
        yield pair


def request(request_id: str, prompt: list[int], sampling=GREEDY, **kwargs) -> EngineRequest:
    return EngineRequest(RequestId(request_id), list(prompt), sampling, **kwargs)


def run_until_done(engine, request_ids: set[str]) -> dict[str, list]:
    outputs: dict[str, list] = {rid: [] for rid in request_ids}
    for _ in range(2000):
        if all(outs and outs[-1].finish_reason for outs in outputs.values()):
            return outputs
        for out in engine.step().outputs:
            if out.request_id in outputs:
                outputs[out.request_id].append(out)
    raise AssertionError("the engine did not finish")


def tokens(outputs: list) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]


def aggregated(engine, rid: str, prompt: list[int], sampling=GREEDY) -> list[int]:
    engine.add_request(request(rid, prompt, sampling))
    return tokens(run_until_done(engine, {rid})[rid])


def disaggregated(engines, rid: str, prompt: list[int], sampling=GREEDY):
    """The worker's path: hold_kv prefill, reserve, pull, release, commit, decode. Returns the
    tokens (the prefill's first included), the reservation and the decode outputs."""
    (prefill, prefill_agent, prefill_connector), (decode, _, decode_connector) = engines
    prefill.add_request(request(rid, prompt, prefill_sampling(sampling), hold_kv=True))
    done = run_until_done(prefill, {rid})[rid][-1]
    assert done.finish_reason is not None
    assert done.held_block_ids is not None
    assert prefill.held_blocks(RequestId(rid)) == done.held_block_ids
    first = done.new_token_ids[0]
    reservation = decode.reserve(request(rid, prompt, sampling))
    source = KVSource(
        worker_id=InstanceId("vllm-prefill"),
        agent_name=prefill_agent.name,
        agent_metadata=prefill_agent.metadata(),
        block_descriptors=prefill_connector.describe(done.held_block_ids),
    )
    asyncio.run(decode_connector.pull(source, reservation))
    assert prefill.release(RequestId(rid))
    assert not prefill.release(RequestId(rid))
    finished = decode.commit(RequestId(rid), first)
    if finished is not None:
        return [first], reservation, [finished]
    outs = run_until_done(decode, {rid})[rid]
    return [first, *tokens(outs)], reservation, outs


def test_disaggregated_greedy_tokens_equal_aggregated(engines):
    (prefill, _, _), (decode, _, _) = engines
    for index, length in enumerate((70, 64, 33, 5)):  # partial, whole and tiny vLLM blocks
        prompt = [(17 * index + 3 * i) % 500 + 10 for i in range(length)]
        got, reservation, outs = disaggregated(engines, f"disagg-{index}", prompt)
        assert reservation.num_cached_tokens == 0
        assert len(reservation.block_ids) == -(-length // 32)
        assert outs[-1].finish_reason is FinishReason.LENGTH
        assert outs[-1].num_output_tokens == GREEDY.max_tokens
        assert outs[-1].num_cached_tokens == 0  # pulled, not cached
        want = aggregated(prefill, f"agg-{index}", prompt)
        assert got == want, f"prompt of {length} tokens"
    # The holds went back to vLLM: a step frees them (nothing stays reported).
    prefill.step()
    assert not prefill.has_unfinished()
    assert not decode.has_unfinished()


def test_a_locally_cached_prefix_is_not_pulled(engines):
    (prefill, _, _), (decode, _, _) = engines
    prompt = [(7 * i) % 400 + 20 for i in range(100)]  # three full vLLM blocks and a part
    want = aggregated(decode, "cached-agg", prompt)  # the decode engine caches 96 tokens
    got, reservation, outs = disaggregated(engines, "cached", prompt)
    assert reservation.num_cached_tokens == 96
    assert outs[-1].num_cached_tokens == 96
    assert got == want
    # A prompt the decode engine caches whole is added afresh at commit: nothing to load.
    whole = prompt[:64]
    want = aggregated(prefill, "whole-agg", whole)
    got, reservation, _ = disaggregated(engines, "whole", whole)
    assert reservation.num_cached_tokens == 64
    assert got == want


def test_a_first_token_that_ends_the_request_finishes_it_at_commit(engines):
    prompt = list(range(40, 90))
    got, _, outs = disaggregated(
        engines, "one", prompt, SamplingParams(max_tokens=1, temperature=0.0)
    )
    assert len(got) == 1
    assert outs[0].finish_reason is FinishReason.LENGTH
    assert outs[0].new_token_ids == []
    (_, _, _), (decode, _, _) = engines
    decode.step()
    assert not decode.has_unfinished()


def test_abort_frees_reservations_and_holds(engines):
    (prefill, _, _), (decode, _, _) = engines
    prompt = list(range(200, 260))
    free = decode.stats().num_free_blocks
    decode.reserve(request("gone", prompt))
    assert decode.abort(RequestId("gone"))
    with pytest.raises(KeyError):
        decode.commit(RequestId("gone"), 5)
    prefill.add_request(request("held", prompt, prefill_sampling(GREEDY), hold_kv=True))
    run_until_done(prefill, {"held"})
    assert prefill.abort(RequestId("held"))
    with pytest.raises(KeyError):
        prefill.held_blocks(RequestId("held"))
    for engine in (prefill, decode):
        for _ in range(3):
            engine.step()
        assert not engine.has_unfinished()
    assert decode.stats().num_free_blocks == free
    with pytest.raises(InvalidRequest):
        decode.reserve(request("moved", prompt), is_moved=True)
    with pytest.raises(ValueError, match="does not migrate"):
        decode.detach(RequestId("x"))


def test_reserve_is_overloaded_when_vllm_runs_max_num_seqs(engines):
    (_, _, _), (decode, _, _) = engines
    busy = [f"busy-{i}" for i in range(CONFIG.max_num_seqs)]
    for index, rid in enumerate(busy):
        prompt = [(11 * index + i) % 300 + 30 for i in range(20)]
        decode.add_request(request(rid, prompt, SamplingParams(max_tokens=200, temperature=0.0)))
    decode.step()
    with pytest.raises(Overloaded):
        decode.reserve(request("no-room", list(range(300, 340))))
    for rid in busy:
        assert decode.abort(RequestId(rid))
    for _ in range(3):
        decode.step()
    assert not decode.has_unfinished()
    # Room again: the same request reserves.
    decode.reserve(request("no-room", list(range(300, 340))))
    assert decode.abort(RequestId("no-room"))
    decode.step()
