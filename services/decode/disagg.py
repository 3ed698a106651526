"""Conditional disaggregation: which prompts a decode worker sends to a prefill worker."""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class DisaggPolicy:
    """Prefill remotely only when it pays: the uncached part of the prompt is long
    (``>= min_remote_tokens``) and not mostly cached already (its uncached fraction is
    ``>= min_remote_fraction``). Short or mostly cached prompts are cheaper to prefill here
    than to move: the transfer has a fixed cost and local prefill reuses the local cache.
    Dynamo's defaults are the same thresholds: 2,048 tokens and 30 % uncached."""

    min_remote_tokens: int = 2048
    min_remote_fraction: float = 0.3

    def __post_init__(self) -> None:
        if self.min_remote_tokens < 0:
            raise ValueError(f"min_remote_tokens must be >= 0, got {self.min_remote_tokens}")
        if not 0.0 <= self.min_remote_fraction <= 1.0:
            raise ValueError(
                f"min_remote_fraction must be in [0, 1], got {self.min_remote_fraction}"
            )

    def is_remote(self, num_prompt_tokens: int, num_cached_tokens: int) -> bool:
        uncached = num_prompt_tokens - num_cached_tokens
        if uncached <= 0 or uncached < self.min_remote_tokens:
            return False
        return uncached / num_prompt_tokens >= self.min_remote_fraction
