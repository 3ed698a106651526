"""The contract every engine serves (simulated now, torch next), so services work with either.

An engine is synchronous and single-owner: one asyncio task (``shared.engine.loop``) owns it,
applies queued adds and aborts between steps, calls ``step()`` and publishes what it returns.
Nothing here does I/O.
"""

from dataclasses import dataclass, field
from typing import Protocol

from proto.messages import FinishReason, KVEvent, RequestId, SamplingParams


@dataclass(slots=True)
class EngineRequest:
    """One request as an engine sees it."""

    request_id: RequestId
    token_ids: list[int]
    sampling: SamplingParams
    arrival_time_s: float = 0.0


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request. ``finish_reason`` set means it is done and its
    blocks are already freed (or returned to the prefix cache)."""

    request_id: RequestId
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


@dataclass(slots=True)
class StepResult:
    """The outputs of one step and how long the step takes on the modelled hardware.

    ``duration_s`` is the simulated device time: the caller waits until that much time has
    passed since the step began before it publishes the outputs. A real engine returns the
    time it actually took (so the caller waits no more).
    """

    outputs: list[RequestOutput] = field(default_factory=list)
    duration_s: float = 0.0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0


@dataclass(slots=True, frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int

    @property
    def kv_usage(self) -> float:
        if self.num_total_blocks == 0:
            return 0.0
        return 1.0 - self.num_free_blocks / self.num_total_blocks


class Engine(Protocol):
    """A continuous-batching engine."""

    @property
    def block_size(self) -> int: ...

    @property
    def max_model_len(self) -> int: ...

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request. Raises ``shared.errors.InvalidRequest`` if it can never run
        (prompt plus max_tokens over the context, or more blocks than the whole cache)."""

    def abort(self, request_id: RequestId) -> bool:
        """Drop a request and free its blocks; False if it was unknown (already finished)."""

    def has_unfinished(self) -> bool: ...

    def step(self) -> StepResult:
        """Schedule one batch, run it, and return what it produced."""

    def stats(self) -> EngineStats: ...

    def take_kv_events(self) -> list[KVEvent]:
        """KV events since the last call, in order (blocks stored, removed, cache cleared)."""
