"""What a role adds to the worker shell: how its requests start, what a step's outputs become
for them, and how one ends early. The shell does everything else (see ``shell``)."""

import abc
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

    async def hand_off(self) -> int:
        """At drain: move the in-flight requests to peers rather than finish them here, if the
        role can (a decode worker's live migration); how many moved. Called once, after new
        work is refused and before the drain waits for ``in_flight``."""
        return 0

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
