import math

import pytest

from shared.engine.timing import TimingModel


def test_prefill_ms_is_quadratic_plus_linear_plus_constant():
    timing = TimingModel(prefill_quadratic_ms=2e-6, prefill_linear_ms=0.01, prefill_const_ms=4.0)

    assert timing.prefill_ms(1000) == pytest.approx(2.0 + 10.0 + 4.0)
    assert timing.prefill_ms(0) == 0.0


def test_default_prefill_is_in_small_gpu_model_ballpark():
    timing = TimingModel()

    assert timing.prefill_ms(1) == pytest.approx(1e-6 + 0.015 + 5.0)
    assert 20.0 < timing.prefill_ms(1000) < 25.0


def test_decode_ms_grows_with_kv_usage_and_batch():
    timing = TimingModel(decode_const_ms=6.0, decode_per_seq_ms=0.01, decode_full_kv_ms=10.0)

    assert timing.decode_ms(100, 0.5) == pytest.approx(6.0 + 1.0 + 5.0)
    assert timing.decode_ms(100, 0.9) > timing.decode_ms(100, 0.1)
    assert timing.decode_ms(200, 0.5) > timing.decode_ms(100, 0.5)
    assert timing.decode_ms(0, 0.5) == 0.0


def test_step_ms_adds_prefill_and_decode_parts():
    timing = TimingModel()

    assert timing.step_ms([512], 64, 0.3) == pytest.approx(
        timing.prefill_ms(512) + timing.decode_ms(64, 0.3)
    )
    assert timing.step_ms([], 0, 0.0) == 0.0


def test_transfer_ms_is_latency_plus_bytes_over_bandwidth():
    timing = TimingModel(transfer_latency_ms=0.5, transfer_bandwidth_bytes_per_s=10e9)

    assert timing.transfer_ms(20_000_000) == pytest.approx(0.5 + 2.0)
    assert timing.transfer_ms(0) == 0.0


def test_speedup_divides_every_time():
    base = TimingModel()
    fast = TimingModel(speedup=4.0)

    assert fast.prefill_ms(300) == pytest.approx(base.prefill_ms(300) / 4)
    assert fast.decode_ms(8, 0.2) == pytest.approx(base.decode_ms(8, 0.2) / 4)
    assert fast.transfer_ms(10**6) == pytest.approx(base.transfer_ms(10**6) / 4)


def test_infinite_speedup_makes_every_time_zero():
    timing = TimingModel(speedup=math.inf)

    assert timing.step_ms([4096], 512, 1.0) == 0.0
    assert timing.transfer_ms(10**9) == 0.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("speedup", 0.0),
        ("prefill_linear_ms", -1.0),
        ("decode_const_ms", math.nan),
        ("transfer_bandwidth_bytes_per_s", 0.0),
    ],
)
def test_timing_model_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        TimingModel(**{field: value})


def test_batched_prefill_pays_the_quadratic_term_per_prompt():
    timing = TimingModel(prefill_quadratic_ms=1e-3, prefill_linear_ms=0.01, prefill_const_ms=2.0)
    # Two 100-token prompts: 2 * 100**2 * 1e-3 + 200 * 0.01 + 2 (one constant per step).
    assert timing.prefill_batch_ms([100, 100]) == pytest.approx(20.0 + 2.0 + 2.0)
    assert timing.prefill_batch_ms([100, 100]) < timing.prefill_ms(200)
    assert timing.prefill_batch_ms([300]) == pytest.approx(timing.prefill_ms(300))
    assert timing.prefill_batch_ms([]) == 0.0
