"""How long modelled GPU work takes: prefill, decode, mixed steps and KV transfers.

The defaults are in the ballpark of a ~1B-parameter model on one modern GPU. They are not a
benchmark; they give the simulated engine the right shapes: prefill superlinear in new tokens,
decode bound by reading weights plus the KV cache, transfers paying latency plus bandwidth.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True, kw_only=True)
class TimingModel:
    """Cost model of one engine step, in milliseconds, every result divided by ``speedup``.

    - ``prefill_ms(T) = prefill_quadratic_ms * T**2 + prefill_linear_ms * T + prefill_const_ms``
      for ``T > 0`` new tokens (0 for none): attention is quadratic, the MLP linear. A batch of
      prompts pays the quadratic term per prompt (attention never crosses sequences), the
      linear term on the total and the constant once: ``prefill_batch_ms``.
    - ``decode_ms(B, u) = decode_const_ms + decode_per_seq_ms * B + decode_full_kv_ms * u`` for a
      batch of ``B > 0`` sequences (0 for none) with the KV cache a fraction ``u`` full: decode
      is memory-bound, reading the weights once and then every cached token's KV.
    - ``step_ms`` of a mixed step is the prefill part plus the decode part.
    - ``transfer_ms(n) = transfer_latency_ms + n / transfer_bandwidth_bytes_per_s * 1000`` for
      moving ``n > 0`` bytes of KV between workers (0 for none).

    ``speedup`` runs the simulation faster than the modelled hardware; ``math.inf`` makes every
    time 0, for tests that only care about tokens.
    """

    prefill_quadratic_ms: float = 1e-6
    prefill_linear_ms: float = 0.015
    prefill_const_ms: float = 5.0
    decode_const_ms: float = 6.0
    decode_per_seq_ms: float = 0.01
    decode_full_kv_ms: float = 10.0
    transfer_latency_ms: float = 0.5
    transfer_bandwidth_bytes_per_s: float = 25e9
    speedup: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if math.isnan(value) or value < 0:
                raise ValueError(f"{f.name} must be >= 0, got {value}")
        if self.speedup <= 0:
            raise ValueError(f"speedup must be > 0, got {self.speedup}")
        bandwidth = self.transfer_bandwidth_bytes_per_s
        if bandwidth <= 0:
            raise ValueError(f"transfer_bandwidth_bytes_per_s must be > 0, got {bandwidth}")

    def prefill_ms(self, num_new_tokens: int) -> float:
        """Time to compute KV for ``num_new_tokens`` prompt tokens in one step."""
        if num_new_tokens <= 0:
            return 0.0
        t = num_new_tokens
        ms = self.prefill_quadratic_ms * t * t + self.prefill_linear_ms * t + self.prefill_const_ms
        return ms / self.speedup

    def prefill_batch_ms(self, new_token_counts: Sequence[int]) -> float:
        """Time to prefill several prompts in one step, ``new_token_counts`` tokens each."""
        total = sum(new_token_counts)
        if total <= 0:
            return 0.0
        squares = sum(t * t for t in new_token_counts)
        ms = self.prefill_quadratic_ms * squares + self.prefill_linear_ms * total
        return (ms + self.prefill_const_ms) / self.speedup

    def decode_ms(self, num_seqs: int, kv_usage: float) -> float:
        """Time for one decode token for each of ``num_seqs`` sequences at KV usage ``kv_usage``
        (0..1)."""
        if num_seqs <= 0:
            return 0.0
        ms = (
            self.decode_const_ms
            + self.decode_per_seq_ms * num_seqs
            + self.decode_full_kv_ms * kv_usage
        )
        return ms / self.speedup

    def step_ms(
        self, prefill_token_counts: Sequence[int], num_decode_seqs: int, kv_usage: float
    ) -> float:
        """Time of a step that prefills prompts of ``prefill_token_counts`` new tokens and
        decodes ``num_decode_seqs`` sequences."""
        return self.prefill_batch_ms(prefill_token_counts) + self.decode_ms(
            num_decode_seqs, kv_usage
        )

    def transfer_ms(self, num_bytes: int) -> float:
        """Time to move ``num_bytes`` of KV cache from one worker to another."""
        if num_bytes <= 0:
            return 0.0
        ms = self.transfer_latency_ms + num_bytes / self.transfer_bandwidth_bytes_per_s * 1000.0
        return ms / self.speedup
