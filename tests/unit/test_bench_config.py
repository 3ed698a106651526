"""baton-bench flags, env vars and request bodies."""

import msgspec
import pytest

from services.bench.client import Share, request_body
from services.bench.config import BenchConfig, expand_bare_flags
from services.bench.outcome import Objectives
from services.bench.workload import RequestPlan
from shared.config import load_config


def test_bare_boolean_flags_mean_true():
    assert expand_bare_flags(["--quiet", "--send-slo"]) == ["--quiet=true", "--send-slo=true"]
    assert expand_bare_flags(["--quiet", "false", "--rate", "5"]) == [
        "--quiet",
        "false",
        "--rate",
        "5",
    ]


def test_every_flag_is_also_a_bench_env_var():
    env = {"BATON_BENCH_RATE": "7.5", "BATON_BENCH_SLO_TTFT_MS": "300"}
    config = load_config(BenchConfig, "bench", ["--stages", "1:2"], env=env)
    assert (config.rate, config.slo_ttft_ms, config.stages) == (7.5, 300.0, "1:2")
    assert config.slo_tpot_ms is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arrival": "uniform"}, "arrival"),
        ({"stages": "1:2", "trace": "t.csv"}, "exclude"),
        ({"stages": "x"}, "stages"),
        ({"burstiness": 0.0}, "burstiness"),
        ({"priority_mix": "high=2"}, "priority_mix"),
        ({"shed_statuses": "429,abc"}, "shed_statuses"),
        ({"slo_ttft_ms": 0.0}, "slo_ttft_ms"),
        ({"client_procs": 0}, "client_procs"),
    ],
)
def test_bad_settings_are_refused_with_their_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BenchConfig(**kwargs)


def test_request_body_streams_token_ids_with_priority_and_objectives():
    plan = RequestPlan(
        index=0, due_s=0.0, stage=0, num_prompt_tokens=5, num_output_tokens=9, priority=-1
    )
    share = Share(
        url="http://x",
        model="baton-sim",
        seed=1,
        plans=[plan],
        objectives=Objectives.from_ms(200, 40),
        send_slo=True,
        shed_statuses=frozenset({429}),
        request_timeout_s=5.0,
    )
    body = msgspec.json.decode(request_body(share, plan))
    assert len(body["prompt"]) == 5
    assert all(isinstance(t, int) for t in body["prompt"])
    assert body["max_tokens"] == 9
    assert body["ignore_eos"] is True
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["priority"], body["slo_ttft_ms"], body["slo_tpot_ms"]) == (-1, 200.0, 40.0)


def test_request_body_leaves_out_unasked_fields():
    plan = RequestPlan(index=0, due_s=0.0, stage=0, num_prompt_tokens=5, num_output_tokens=9)
    share = Share(
        url="http://x",
        model="m",
        seed=1,
        plans=[plan],
        objectives=Objectives.from_ms(200, None),
        send_slo=False,
        shed_statuses=frozenset({429}),
        request_timeout_s=5.0,
    )
    body = msgspec.json.decode(request_body(share, plan))
    assert not {"priority", "slo_ttft_ms", "slo_tpot_ms"} & set(body)
