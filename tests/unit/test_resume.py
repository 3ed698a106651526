"""A migrated request resumes after the tokens it already produced: the engine recomputes
their KV and continues with exactly the tokens one engine alone would have produced."""

import math

import pytest

from proto.messages import RequestId, SamplingParams
from shared.engine.interface import EngineRequest
from shared.engine.sim import SimEngine, SimEngineConfig
from shared.engine.timing import TimingModel
from shared.errors import InvalidRequest

PROMPT = list(range(100, 137))


def engine() -> SimEngine:
    return SimEngine(
        SimEngineConfig(num_kv_blocks=128, vocab_size=1000, timing=TimingModel(speedup=math.inf))
    )


def run(request: EngineRequest) -> list[int]:
    e = engine()
    e.add_request(request)
    tokens: list[int] = []
    while e.has_unfinished():
        for out in e.step().outputs:
            tokens.extend(out.new_token_ids)
    return tokens


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.9, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.9),  # unseeded: keyed by request id
    ],
)
def test_resumed_request_continues_with_the_same_tokens(sampling):
    whole = run(EngineRequest(RequestId("r"), PROMPT, sampling))

    for k in (1, 7, len(whole) - 1):
        rest = run(EngineRequest(RequestId("r"), PROMPT, sampling, resumed_token_ids=whole[:k]))
        assert rest == whole[k:]


def test_resume_refuses_what_cannot_continue():
    sampling = SamplingParams(max_tokens=3, ignore_eos=True)
    with pytest.raises(InvalidRequest, match="max_tokens"):
        engine().add_request(
            EngineRequest(RequestId("r"), PROMPT, sampling, resumed_token_ids=[5, 6, 7])
        )
    with pytest.raises(InvalidRequest, match="vocabulary"):
        engine().add_request(
            EngineRequest(RequestId("r"), PROMPT, sampling, resumed_token_ids=[5000])
        )
