"""What a role adds to the worker shell: how its requests start, what a step's outputs become
for them, and how one ends early. The shell does everything else (see ``shell``)."""

import abc
import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from proto.messages import (
    FinishReason,
    GenerateRequest,
    InstanceId,
    PrefillRequest,
    RequestId,
    WorkerRole,
)
from services.worker.inflight import InFlight
from services.worker.objectives import Admission
from shared.bus import Bus
from shared.engine.interface import StepResult
from shared.engine.loop import EngineLoop


@dataclass(frozen=True, slots=True)
class WorkerContext:
    """What the shell gives its role: the bus, this worker's identity and its engine loop
    (the engine's only owner)."""

    bus: Bus
    namespace: str
    worker_id: InstanceId
    loop: EngineLoop


class Role(abc.ABC):
    """One role of a worker (prefill or decode).

    ``in_flight`` holds every request the role still owes an answer or tokens to; the shell
    reads it for duplicate ids and for the drain, the role adds and removes entries.
    """

    kind: ClassVar[WorkerRole]
    request_type: ClassVar[type[GenerateRequest] | type[PrefillRequest]]
    in_flight: InFlight[Any]

    @abc.abstractmethod
    async def admit(self, request: Any, reply_subject: str, admission: Admission) -> None:
        """Start a request the shell has checked (not draining, not a duplicate, under the
        waiting cap, of ``request_type``, admitted with ``admission``'s deadline and
        priority). Raise ``ServingError`` to refuse it: the shell answers ``reply_subject``
        with the error. A positive answer is the role's to send."""

    def prefills_here(self, request: Any) -> bool:
        """Whether this worker's engine will prefill the request (admission predicts its
        time to first token only then)."""
        return True

    def holds_output(self) -> bool:
        """Decide, for the step just taken, whether ``deliver`` will hold its outputs for a
        later step's message rather than send them now (the decision is kept for that
        ``deliver``). The shell asks first: while every role holds, it holds the step's KV
        events too, so that they go out with the outputs, and before them."""
        return False

    @abc.abstractmethod
    async def deliver(self, result: StepResult) -> None:
        """Hand on what one engine step produced. A failure to deliver to one destination
        ends only the requests bound there (through ``end``)."""

    @abc.abstractmethod
    async def end(
        self, request_id: RequestId, reason: FinishReason, error: str | None = None
    ) -> None:
        """The one way a request ends before the engine finishes it: the client aborted
        (``ABORT``, no error), the worker is shutting down, or delivery or a handoff failed.
        Frees it wherever it is (engine queue, batch, a handoff under way), removes it from
        ``in_flight`` and, when ``error`` is given, tells its requester once. Idempotent."""

    async def release(self, request_id: RequestId) -> None:
        """A decode worker has read (or given up on) this request's KV (``KVRelease``)."""
        return

    async def move_out(self) -> int:
        """Move the in-flight requests to peers now rather than finish them here, if the role
        can (a decode worker's live migration), without waiting for the peers to read what
        they are lent; how many moved. Called once, after new work is refused: by
        ``hand_off`` at drain, or when the worker changes role."""
        return 0

    async def hand_off(self) -> int:
        """At drain: ``move_out``, then wait (bounded) until the peers have read what they
        were lent; how many moved. Called once, before the drain waits for ``in_flight``."""
        return await self.move_out()

    async def settle(self, timeout_s: float) -> None:
        """Once retired (the worker changed role; ``move_out`` already ran): wait until the
        role owes nothing, neither a request nor KV held for a peer, for up to ``timeout_s``;
        then end what is left with a reason, so that no requester waits on it."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.in_flight.idle.wait()
        except TimeoutError:
            for request_id in self.in_flight:
                await self.end(request_id, FinishReason.ABORT, "the worker changed role")

    def counters(self) -> Mapping[str, float]:
        """What the role counted so far, by metric name; the shell adds those of the roles a
        worker had before (``/metrics``)."""
        return {}

    async def run(self) -> None:
        """Background work the role needs while the worker lives (the shell owns the task)."""
        return

    async def close(self) -> None:
        """Stop and await every task the role started; called once, at shutdown."""
        return

    @property
    def num_handoffs(self) -> int:
        """Requests admitted here that the engine does not see yet (their KV is coming)."""
        return 0
