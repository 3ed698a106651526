"""baton-bench workloads: trace parsing, windows, scaling, prompts and priorities (pure)."""

import json

import pytest

from services.bench.workload import (
    MAX_TOKEN_ID,
    MIN_TOKEN_ID,
    RequestPlan,
    TraceRow,
    load_trace,
    parse_azure_timestamp,
    parse_priority_mix,
    plan_synthetic,
    plan_trace,
    prompt_token_ids,
    scale,
    trace_format_of,
    window,
)

AZURE_CSV = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:17:03.9799600,4808,10
2023-11-16 18:17:04.0319600,3180,8
2023-11-16 18:17:06.4799600,110,27
2023-11-16 18:17:05.9799600,7433,14
"""

MOONCAKE_ROWS = [
    {"timestamp": 1000, "input_length": 1100, "output_length": 40, "hash_ids": [0, 1, 2]},
    {"timestamp": 1500, "input_length": 1200, "output_length": 8, "hash_ids": [0, 1, 3]},
    {"timestamp": 4000, "input_length": 300, "output_length": 500, "hash_ids": [4]},
]


@pytest.fixture
def azure_path(tmp_path):
    path = tmp_path / "azure.csv"
    path.write_text(AZURE_CSV)
    return str(path)


@pytest.fixture
def mooncake_path(tmp_path):
    path = tmp_path / "mooncake.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in MOONCAKE_ROWS))
    return str(path)


def test_azure_timestamps_keep_seven_fractional_digits():
    first = parse_azure_timestamp("2023-11-16 18:17:03.9799600")
    assert parse_azure_timestamp("2023-11-16 18:17:04.0319600") - first == pytest.approx(0.052)
    assert parse_azure_timestamp("2023-11-16 18:17:05") - first == pytest.approx(1.02004, abs=1e-6)


def test_azure_trace_is_read_relative_to_its_first_request_in_time_order(azure_path):
    rows = load_trace(azure_path)
    assert [r.arrival_s for r in rows] == pytest.approx([0.0, 0.052, 2.0, 2.5])
    assert [(r.num_prompt_tokens, r.num_output_tokens) for r in rows] == [
        (4808, 10),
        (3180, 8),
        (7433, 14),
        (110, 27),
    ]
    assert all(r.hash_ids == () for r in rows)


def test_azure_trace_without_its_columns_is_refused(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("time,tokens\n1,2\n")
    with pytest.raises(ValueError, match="expected columns"):
        load_trace(str(path))


def test_mooncake_trace_converts_milliseconds_and_keeps_hash_ids(mooncake_path):
    rows = load_trace(mooncake_path)
    assert [r.arrival_s for r in rows] == [0.0, 0.5, 3.0]
    assert rows[1] == TraceRow(0.5, 1200, 8, (0, 1, 3))


def test_mooncake_bad_line_names_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1}\n{"timestamp": "x"}\n')
    with pytest.raises(ValueError, match="line 2"):
        load_trace(str(path))


def test_trace_format_follows_the_suffix_unless_given():
    assert trace_format_of("a/b.csv", "auto") == "azure"
    assert trace_format_of("a/b.jsonl", "auto") == "mooncake"
    assert trace_format_of("a/b.txt", "azure") == "azure"
    with pytest.raises(ValueError, match="trace-format"):
        trace_format_of("a/b.txt", "auto")


def test_window_picks_and_rebases_a_span_of_the_trace():
    rows = [TraceRow(t, 10, 10) for t in (0.0, 1.0, 2.0, 3.0, 4.0)]
    assert [r.arrival_s for r in window(rows, 1.0, 2.0)] == [0.0, 1.0]
    assert [r.arrival_s for r in window(rows, 2.5, 0.0)] == [0.5, 1.5]


def test_scale_compresses_time_and_scales_then_clamps_lengths():
    rows = [TraceRow(4.0, 1000, 100), TraceRow(8.0, 100_000, 9000), TraceRow(9.0, 1, 1)]
    scaled = scale(
        rows, time_scale=2.0, length_scale=0.25, max_prompt_tokens=4000, max_output_tokens=500
    )
    assert [r.arrival_s for r in scaled] == [2.0, 4.0, 4.5]
    assert [(r.num_prompt_tokens, r.num_output_tokens) for r in scaled] == [
        (250, 25),
        (4000, 500),
        (1, 1),
    ]
    assert scaled[0].block_tokens == 128  # 512 * 0.25


def test_equal_hash_ids_give_equal_token_blocks(mooncake_path):
    rows = scale(
        load_trace(mooncake_path),
        time_scale=1.0,
        length_scale=0.25,
        max_prompt_tokens=4000,
        max_output_tokens=4000,
    )
    plans = plan_trace(rows, {}, seed=0)
    a, b, c = (prompt_token_ids(p, seed=5) for p in plans)
    assert (len(a), len(b), len(c)) == (275, 300, 75)
    assert a[:256] == b[:256]  # blocks 0 and 1 are shared
    assert a[256:] != b[256:275]  # blocks 2 and 3 differ
    assert a[:75] != c  # block 4 is its own
    assert all(MIN_TOKEN_ID <= t < MAX_TOKEN_ID for t in a + b + c)
    # Blocks depend on the prompt seed: another run does not hit this one's cache.
    assert prompt_token_ids(plans[0], seed=6)[:128] != a[:128]


def test_synthetic_prompts_share_only_the_prefix():
    plans = plan_synthetic(
        [0.0, 0.1],
        [0, 0],
        prompt_tokens=50,
        output_tokens=7,
        prefix_tokens=20,
        priority_mix={},
        seed=0,
    )
    a, b = (prompt_token_ids(p, seed=1) for p in plans)
    assert len(a) == len(b) == 70
    assert a[:20] == b[:20]
    assert a[20:] != b[20:]
    assert plans[0].num_output_tokens == 7
    assert prompt_token_ids(plans[0], seed=1) == a  # a function of seed and plan alone


def test_prompts_longer_than_their_blocks_are_padded_with_their_own_ids():
    plan = RequestPlan(
        index=3,
        due_s=0.0,
        stage=0,
        num_prompt_tokens=10,
        num_output_tokens=1,
        hash_ids=(9,),
        block_tokens=4,
    )
    ids = prompt_token_ids(plan, seed=0)
    assert len(ids) == 10
    assert ids[:4] == prompt_token_ids(
        RequestPlan(
            index=4,
            due_s=0.0,
            stage=0,
            num_prompt_tokens=4,
            num_output_tokens=1,
            hash_ids=(9,),
            block_tokens=4,
        ),
        seed=0,
    )


def test_priority_mix_names_map_to_vllm_priorities():
    assert parse_priority_mix("high=0.1, low=0.2") == {-1: 0.1, 1: 0.2}
    assert parse_priority_mix("") == {}
    for bad in ("urgent=0.1", "high=2", "high=0.6,low=0.6", "high"):
        with pytest.raises(ValueError, match="priority_mix"):
            parse_priority_mix(bad)


def test_priority_mix_sends_each_priority_to_its_fraction():
    due = [i / 100 for i in range(10_000)]
    plans = plan_synthetic(
        due,
        [0] * len(due),
        prompt_tokens=1,
        output_tokens=1,
        prefix_tokens=0,
        priority_mix={-1: 0.1, 1: 0.2},
        seed=3,
    )
    priorities = [p.priority for p in plans]
    assert priorities.count(-1) == pytest.approx(1000, rel=0.1)
    assert priorities.count(1) == pytest.approx(2000, rel=0.1)
    assert priorities.count(None) == pytest.approx(7000, rel=0.05)
