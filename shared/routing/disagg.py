"""Conditional disaggregation: whether a prompt's prefill is worth moving off its decode
worker (pure)."""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class DisaggPolicy:
    """Send a prefill to a prefill worker only when moving it pays for the transfer.

    Remote prefill wins when the part of the prompt the decode worker does not cache is long
    (at least ``min_remote_tokens`` tokens) and is a real share of the prompt (at least
    ``min_remote_fraction`` of it). Otherwise the decode worker prefills the prompt itself:
    a short prompt computes faster than a KV transfer's fixed cost, and a mostly cached one
    reuses the decode worker's own blocks, which a remote prefill would recompute and ship.
    The defaults, 2,048 tokens and 30 %, are Dynamo's.

    And only while the prefill pool keeps up: when its least busy worker would start the
    prompt more than ``max_extra_wait_s`` later than the decode worker would start it
    itself, the decode worker prefills it (a prefill pool one worker short must not leave
    the decode workers idle while prompts queue).
    """

    min_remote_tokens: int = 2048
    min_remote_fraction: float = 0.3
    # Even then, prefill here when the prefill pool's queue would hold the prompt this much
    # longer than this worker's own queue (inf: never).
    max_extra_wait_s: float = 0.25

    def __post_init__(self) -> None:
        if self.min_remote_tokens < 0:
            raise ValueError(f"min_remote_tokens must be >= 0, got {self.min_remote_tokens}")
        if not 0.0 <= self.min_remote_fraction <= 1.0:
            raise ValueError(
                f"min_remote_fraction must be in [0, 1], got {self.min_remote_fraction}"
            )
        if not self.max_extra_wait_s >= 0:  # NaN too
            raise ValueError(f"max_extra_wait_s must be >= 0, got {self.max_extra_wait_s}")

    def is_remote(self, num_prompt_tokens: int, num_cached_tokens: int) -> bool:
        """Whether a prompt of ``num_prompt_tokens``, of which the decode worker caches the
        first ``num_cached_tokens``, should be prefilled on a prefill worker."""
        num_uncached = num_prompt_tokens - num_cached_tokens
        if num_uncached <= 0 or num_uncached < self.min_remote_tokens:
            return False
        return num_uncached / num_prompt_tokens >= self.min_remote_fraction

    def is_worth_the_wait(self, remote_wait_s: float, local_wait_s: float) -> bool:
        """Whether a prompt should still go to the prefill pool, whose least busy worker
        would start it after ``remote_wait_s`` where the decode worker would start it after
        ``local_wait_s`` (each worker's own prediction, plus what was routed to it since)."""
        return remote_wait_s - local_wait_s <= self.max_extra_wait_s
