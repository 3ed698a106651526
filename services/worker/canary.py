"""Is the engine serving? The evidence behind a worker's ``/ready``.

A step that completed recently proves the engine works, at no cost. An idle engine has
no recent step, so then (at most once per ``interval_s``, whoever asks) a canary goes through
the real path: a one-token prompt, one output token, queued in the engine loop like any request,
and the engine must finish it within ``timeout_s``. Its output reaches no one (the roles skip
outputs of requests they do not hold) and its single token fills no block, so no router hears
of it. A busy engine whose last step is older than ``stall_s`` (a stuck step, a wedged loop)
is not ready either, without a canary: it would only queue behind the stuck work.
"""

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass

from proto.messages import InstanceId, RequestId, SamplingParams
from shared.engine.interface import EngineRequest, StepResult
from shared.engine.loop import EngineLoop
from shared.errors import ServingError

_SAMPLING = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


@dataclass(frozen=True, slots=True)
class CanaryResult:
    is_ok: bool
    how: str  # "step" (a recent step proves it), "canary" (one ran) or "stalled"
    detail: str = ""


class EngineCanary:
    """The engine's liveness for ``/ready``: a recent step, else a one-token canary request."""

    def __init__(
        self,
        loop: EngineLoop,
        worker_id: InstanceId,
        *,
        interval_s: float = 10.0,
        timeout_s: float = 5.0,
        stall_s: float = 60.0,
    ) -> None:
        self._loop = loop
        self._worker_id = worker_id
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._stall_s = stall_s
        self._ids = itertools.count()
        self._pending: dict[RequestId, asyncio.Future[None]] = {}
        self._last: tuple[float, CanaryResult] | None = None
        self._running: asyncio.Task[CanaryResult] | None = None
        self._created_s = time.monotonic()
        self.last_step_s: float | None = None  # set by ``observe``: when the last step ended
        self.num_canaries = 0
        self.num_failures = 0

    def observe(self, result: StepResult) -> None:
        """Called after every engine step (cheap unless a canary is pending)."""
        self.last_step_s = time.monotonic()
        if self._pending:
            for out in result.outputs:
                waiter = self._pending.get(out.request_id)
                if waiter is not None and out.finish_reason is not None and not waiter.done():
                    waiter.set_result(None)

    async def check(self) -> CanaryResult:
        """Whether the engine serves now; concurrent callers share one canary."""
        now_s = time.monotonic()
        last_step_s = self.last_step_s
        if last_step_s is not None and now_s - last_step_s < self._interval_s:
            return CanaryResult(True, "step")
        stats = self._loop.stats()
        if stats.num_running + stats.num_waiting > 0:
            age_s = now_s - (last_step_s if last_step_s is not None else self._created_s)
            if age_s > self._stall_s:
                return CanaryResult(False, "stalled", f"no step for {age_s:.0f} s with work queued")
            return CanaryResult(True, "step")
        if self._last is not None and now_s - self._last[0] < self._interval_s:
            return self._last[1]
        running = self._running
        if running is None or running.done():
            running = self._running = asyncio.create_task(self._run(), name="canary")
        # wait(), not await: a caller that goes away must not cancel the others' canary.
        await asyncio.wait([running])
        return running.result()

    async def _run(self) -> CanaryResult:
        self.num_canaries += 1
        request_id = RequestId(f"canary-{self._worker_id}-{next(self._ids)}")
        waiter = asyncio.get_running_loop().create_future()
        self._pending[request_id] = waiter
        try:
            request = EngineRequest(
                request_id=request_id,
                token_ids=[0],
                sampling=_SAMPLING,
                arrival_time_s=time.monotonic(),
            )
            async with asyncio.timeout(self._timeout_s):
                await self._loop.add(request)
                await waiter
            result = CanaryResult(True, "canary")
        except (TimeoutError, ServingError) as exc:
            self.num_failures += 1
            result = CanaryResult(False, "canary", repr(exc))
            with contextlib.suppress(TimeoutError):  # a stuck step holds the engine's lock
                async with asyncio.timeout(self._timeout_s):
                    await self._loop.abort(request_id)
        finally:
            del self._pending[request_id]
        self._last = (time.monotonic(), result)
        return result
