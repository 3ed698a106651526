"""The vLLM engine adapter against a real in-process vLLM on a tiny random Llama (CPU).

One engine serves the whole module (vLLM takes 20-50 s to start here). Its weights are the
torch engine's ``--model-path random`` weights, so greedy tokens must match that engine's.
"""

import dataclasses
import json

import pytest

pytest.importorskip("vllm")

from proto.messages import (
    AllBlocksCleared,
    BlockStored,
    FinishReason,
    RequestId,
    SamplingParams,
)
from shared.engine.config import EngineConfig
from shared.engine.factory import build_engine
from shared.engine.interface import EngineRequest
from shared.errors import InvalidRequest
from shared.kv_hash import hash_prompt_blocks
from shared.tokenizer import Tokenizer

pytestmark = [
    pytest.mark.vllm,
    # vLLM's imports warn about their own dependencies; nothing of ours.
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning"),
]

CONFIG = EngineConfig(engine="vllm", num_kv_blocks=256, max_model_len=512, max_num_seqs=8)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = list(range(10, 80))  # 70 tokens: two full vLLM blocks of 32, four Baton blocks of 16


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.load("builtin")


@pytest.fixture(scope="module")
def engine(tokenizer):
    built = build_engine(CONFIG, tokenizer)
    assert built.step_in_thread
    yield built.engine
    built.engine.close()


def request(request_id: str, sampling=GREEDY, prompt=PROMPT, **kwargs) -> EngineRequest:
    return EngineRequest(RequestId(request_id), list(prompt), sampling, **kwargs)


def run(engine, *requests: EngineRequest) -> dict[str, list]:
    """Add the requests, step until none is left; every output of each, in order."""
    for req in requests:
        engine.add_request(req)
    outputs: dict[str, list] = {req.request_id: [] for req in requests}
    for _ in range(1000):
        if not engine.has_unfinished():
            return outputs
        for out in engine.step().outputs:
            outputs[out.request_id].append(out)
    raise AssertionError("the engine did not finish")


def tokens(outputs: list) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]


@pytest.mark.timeout(300)
def test_greedy_tokens_equal_the_torch_engines_on_the_same_weights(engine, tokenizer):
    got = tokens(run(engine, request("greedy"))["greedy"])
    torch_engine = build_engine(dataclasses.replace(CONFIG, engine="torch"), tokenizer).engine
    want = tokens(run(torch_engine, request("greedy"))["greedy"])
    assert len(got) == 8
    assert got == want


def test_max_tokens_ends_with_length_and_counts_outputs(engine):
    outs = run(engine, request("len", SamplingParams(max_tokens=5, temperature=0.0)))["len"]
    assert len(tokens(outs)) == 5
    assert [o.finish_reason for o in outs] == [None] * 4 + [FinishReason.LENGTH]
    assert [o.num_output_tokens for o in outs] == [1, 2, 3, 4, 5]
    assert outs[0].num_prompt_tokens == len(PROMPT)


def test_stop_token_ends_the_request_and_stays_in_the_output(engine):
    greedy = tokens(run(engine, request("ref"))["ref"])
    stop = greedy[2]
    sampling = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop])
    outs = run(engine, request("stop", sampling))["stop"]
    assert tokens(outs) == greedy[: greedy.index(stop) + 1]
    assert outs[-1].finish_reason is FinishReason.STOP
    # min_tokens masks the stop token until then.
    sampling = SamplingParams(max_tokens=8, min_tokens=6, temperature=0.0, stop_token_ids=[stop])
    late = tokens(run(engine, request("late", sampling))["late"])
    assert len(late) >= 6
    assert stop not in late[:6]


def test_eos_ends_the_request_unless_ignore_eos(engine):
    greedy = tokens(run(engine, request("ref-eos"))["ref-eos"])
    shape = engine.shape
    engine.shape = dataclasses.replace(shape, eos_token_id=greedy[1])
    try:
        outs = run(engine, request("eos", SamplingParams(max_tokens=8, temperature=0.0)))["eos"]
        assert tokens(outs) == greedy[:2]
        assert outs[-1].finish_reason is FinishReason.STOP
        ignored = run(engine, request("ignore", GREEDY))["ignore"]
        assert tokens(ignored) == greedy
    finally:
        engine.shape = shape


def test_abort_drops_a_running_request(engine):
    engine.add_request(request("abort", SamplingParams(max_tokens=100, temperature=0.0)))
    engine.step()
    assert engine.stats().num_running == 1
    assert engine.abort(RequestId("abort"))
    assert not engine.abort(RequestId("abort"))
    assert not engine.has_unfinished()
    assert engine.stats().num_running == 0
    # vLLM forgot it too: the id is free again, and it runs to the end.
    outs = run(engine, request("abort", SamplingParams(max_tokens=3, temperature=0.0)))
    assert len(tokens(outs["abort"])) == 3


def test_stats_follow_a_request_through_the_queue(engine):
    idle = engine.stats()
    assert (idle.num_running, idle.num_waiting) == (0, 0)
    assert idle.num_total_blocks >= CONFIG.num_kv_blocks
    engine.add_request(request("stats", SamplingParams(max_tokens=4, temperature=0.0)))
    queued = engine.stats()
    assert (queued.num_running, queued.num_waiting) == (0, 1)
    assert queued.num_waiting_tokens == len(PROMPT) == engine.num_tokens_ahead(0)
    engine.step()
    running = engine.stats()
    assert (running.num_running, running.num_waiting, running.num_waiting_tokens) == (1, 0, 0)
    assert running.num_free_blocks < running.num_total_blocks
    while engine.has_unfinished():
        engine.step()
    done = engine.stats()
    assert (done.num_running, done.num_waiting) == (0, 0)
    assert done.num_free_blocks == done.num_total_blocks


def test_kv_events_carry_baton_hashes_of_full_vllm_blocks(engine):
    prompt = [7, *range(500, 600)]  # 101 tokens: three vLLM blocks, six Baton blocks
    engine.take_kv_events()
    run(engine, request("kv", SamplingParams(max_tokens=2, temperature=0.0), prompt=prompt))
    events = engine.take_kv_events()
    stored = [h for e in events if isinstance(e, BlockStored) for h in e.block_hashes]
    assert not [e for e in events if isinstance(e, AllBlocksCleared)]
    assert stored[:6] == hash_prompt_blocks(prompt, 16)[:6]
    assert engine.cached_prefix_tokens(prompt) == 96
    assert set(hash_prompt_blocks(prompt, 16)[:6]) <= set(engine.cached_block_hashes())
    one = SamplingParams(max_tokens=1, temperature=0.0)
    again = run(engine, request("kv2", one, prompt=prompt))
    assert again["kv2"][0].num_cached_tokens == 96


def test_a_resumed_request_continues_after_its_tokens(engine):
    greedy = tokens(run(engine, request("ref-resume"))["ref-resume"])
    outs = run(engine, request("resume", resumed_token_ids=greedy[:3]))["resume"]
    assert tokens(outs) == greedy[3:]
    assert outs[-1].num_output_tokens == 8
    assert outs[-1].finish_reason is FinishReason.LENGTH


def test_seeded_sampling_repeats(engine):
    sampling = SamplingParams(max_tokens=6, temperature=1.0, seed=42)
    first = tokens(run(engine, request("seed-a", sampling))["seed-a"])
    second = tokens(run(engine, request("seed-b", sampling))["seed-b"])
    assert first == second


def test_logprobs_report_the_chosen_token_and_the_likeliest(engine):
    sampling = SamplingParams(max_tokens=3, temperature=0.0, logprobs=2)
    outs = run(engine, request("lp", sampling))["lp"]
    for out in outs:
        (report,) = out.logprobs
        assert len(report.top) == 2
        assert report.top[0][0] == out.new_token_ids[0]  # greedy: the likeliest
        assert report.logprob == pytest.approx(report.top[0][1])
        assert report.top[0][1] >= report.top[1][1]


def test_a_request_past_its_deadline_is_shed(engine):
    engine.add_request(request("shed", deadline_s=engine.clock() - 1.0))
    result = engine.step()
    assert [(o.request_id, o.finish_reason) for o in result.outputs] == [
        ("shed", FinishReason.SHED)
    ]
    assert not engine.has_unfinished()


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (request("empty", prompt=[]), "empty"),
        (request("long", SamplingParams(max_tokens=500)), "max_model_len"),
        (request("vocab", prompt=[1, 10**6]), "vocabulary"),
        (request("minmax", SamplingParams(max_tokens=2, min_tokens=3)), "min_tokens"),
    ],
)
def test_add_request_refuses_what_could_never_run(engine, req, message):
    with pytest.raises(InvalidRequest, match=message):
        engine.add_request(req)
    assert not engine.has_unfinished()


def test_add_request_refuses_a_duplicate_id(engine):
    engine.add_request(request("dup"))
    try:
        with pytest.raises(InvalidRequest, match="already running"):
            engine.add_request(request("dup"))
    finally:
        engine.abort(RequestId("dup"))


def test_disaggregation_verbs_on_unknown_requests_and_migration(engine):
    # Disaggregation itself: tests/vllm/test_vllm_disaggregated.py.
    assert engine.kv_region is None  # its KV is a tensor per layer: make_connector
    assert not engine.release(RequestId("x"))
    with pytest.raises(KeyError):
        engine.held_blocks(RequestId("x"))
    with pytest.raises(KeyError):
        engine.commit(RequestId("r"), 1)
    with pytest.raises(InvalidRequest, match="does not migrate"):
        engine.reserve(request("r"), is_moved=True)
    with pytest.raises(NotImplementedError):
        engine.resume(RequestId("r"))


@pytest.mark.timeout(300)
def test_a_json_schema_constrains_the_output(engine, tokenizer):
    schema = (
        '{"type": "object", "properties": {"color": {"enum": ["red", "green"]}},'
        ' "required": ["color"], "additionalProperties": false}'
    )
    sampling = SamplingParams(max_tokens=48, temperature=1.0, seed=3, json_schema=schema)
    outputs = run(engine, request("json", sampling))["json"]
    assert outputs[-1].finish_reason is FinishReason.STOP
    text = tokenizer.decode(tokens(outputs))
    value = json.loads(text)
    assert value["color"] in ("red", "green")
    assert set(value) == {"color"}
