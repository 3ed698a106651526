"""Which prompts the router sends to a prefill worker and which the decode worker prefills."""

import pytest

from shared.routing.disagg import DisaggPolicy


@pytest.mark.parametrize(
    ("prompt", "cached", "remote"),
    [
        (100, 0, False),  # short: local
        (4000, 0, True),  # long and uncached: remote
        (4000, 3000, False),  # 1,000 uncached tokens: under 2,048, local
        (4000, 1000, True),  # 3,000 uncached, 75 %: remote
    ],
)
def test_default_policy(prompt, cached, remote):
    assert DisaggPolicy().is_remote(prompt, cached) is remote


def test_mostly_cached_long_prompt_stays_local():
    assert DisaggPolicy().is_remote(10000, 7500) is False  # 25 % uncached
    assert DisaggPolicy().is_remote(10000, 6000) is True  # 40 % uncached


def test_zero_thresholds_send_every_uncached_prompt_remote():
    policy = DisaggPolicy(min_remote_tokens=0, min_remote_fraction=0.0)
    assert policy.is_remote(1, 0) is True
    assert policy.is_remote(32, 32) is False  # nothing to compute


def test_bad_thresholds_are_refused():
    with pytest.raises(ValueError, match="min_remote_fraction"):
        DisaggPolicy(min_remote_fraction=1.5)
