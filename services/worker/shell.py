"""The worker shell: everything a prefill and a decode worker do alike.

- **Inbox**: decode every message on the worker's subject against one typed union, answer a
  malformed one with a typed ``ErrorReply``, refuse a request while draining, a duplicate id,
  a request of the other role's type, one past the waiting cap, or one that would miss its
  time-to-first-token objective (``objectives``); hand the rest to the role.
- **In flight**: the role's ``InFlight`` registry says when nothing is owed any more, which is
  what the drain waits for.
- **Engine steps**: the engine loop calls back here after each step, outside its lock; the
  shell learns the engine's speed from the step, sets the next steps' limits, publishes the
  step's KV events and passes the outputs to the role. A failure to hand
  them on ends only the requests of that step, never the loop.
- **Router feeds**: numbered ``KVEventBatch``es, ``LoadMetrics`` every ``load_interval_s``,
  and the whole cached set on a ``KVStateRequest`` (a router's resync).
- **Lifecycle**: register in etcd, serve until told to stop, then drain: mark the entry
  draining, wait for in-flight work up to the deadline, end the rest with a reason, revoke.
- **Roles over time** (``roles.RoleSet``): a ``RoleSwitch`` (``switch``) replaces the role
  while the worker runs. The old role is then *retiring*: it takes no new work, but it still
  gets every step's outputs, aborts and KV releases until it owes nothing (``Role.settle``),
  beside the new one.
"""

import asyncio
import gc
import logging
import time
from typing import TYPE_CHECKING

import msgspec
from nats.aio.msg import Msg

from proto import subjects
from proto.messages import (
    AbortRequest,
    FinishReason,
    GenerateRequest,
    KVEventBatch,
    KVRelease,
    KVState,
    KVStateRequest,
    LoadMetrics,
    ModelCard,
    PrefillRequest,
    RoleSwitch,
    WorkerInfo,
    WorkerRole,
)
from services.worker.canary import EngineCanary
from services.worker.objectives import Objectives
from services.worker.role import Role, WorkerContext
from services.worker.roles import RoleSet
from shared.codec import encode, worker_inbound_decoder
from shared.discovery import Discovery, Registration
from shared.engine.config import WorkerConfig
from shared.engine.interface import Engine, StepResult
from shared.engine.speed import StepBudget
from shared.errors import InvalidRequest, Overloaded, ServingError, Unavailable
from shared.logs import BadMessages, RateLimitedLog

if TYPE_CHECKING:
    from services.worker.switch import RoleSwitcher

logger = logging.getLogger(__name__)


class WorkerShell:
    """Serves one role's engine on the bus under ``context.worker_id``."""

    def __init__(
        self,
        context: WorkerContext,
        role: Role,
        config: WorkerConfig,
        *,
        max_num_batched_tokens: int = 8192,
    ) -> None:
        self.context = context
        self.objectives = Objectives(config, max_num_batched_tokens=max_num_batched_tokens)
        self.roles = RoleSet(role)
        self.config = config
        self.bus = context.bus
        self.loop = context.loop
        self.inbox = subjects.worker_inbox(context.namespace, context.worker_id)
        self.is_draining = False
        self.is_registered = False
        self.log = RateLimitedLog(logger)
        self.bad_messages = BadMessages(self.log, "worker message")
        self.canary = EngineCanary(self.loop, context.worker_id)
        self.num_delivery_failures = 0
        self.num_arrived = 0  # requests for its role, admitted or not
        self.num_arrived_prefill_tokens = 0  # their prompt tokens, of those it prefills
        self._kv_event_seq = 0
        self._budget_set: StepBudget | None = None  # the engine's, as last set
        self.switcher: RoleSwitcher | None = None  # set by serve(): RoleSwitch is refused without
        self.info: WorkerInfo | None = None  # as registered (set by ``serve``)
        self._registration: Registration | None = None

    @property
    def role(self) -> Role:
        """The role it serves as now (``roles`` also holds the retiring ones)."""
        return self.roles.current

    @property
    def num_in_flight(self) -> int:
        return self.roles.num_in_flight

    @property
    def num_handoffs(self) -> int:
        return self.roles.num_handoffs

    # --- inbox ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to the inbox (the engine loop calls ``on_step`` once it runs)."""
        await self.bus.subscribe(self.inbox, self._on_message)

    @property
    def num_bad_messages(self) -> int:
        return self.bad_messages.num_bad

    async def _on_message(self, msg: Msg) -> None:
        message = self.bad_messages.decode_or_error(worker_inbound_decoder, msg.data, msg.subject)
        if isinstance(message, InvalidRequest):
            if msg.reply:
                await self._reply(msg.reply, message)
            return
        match message:
            case GenerateRequest() | PrefillRequest():
                await self._admit(message, msg.reply)
            case AbortRequest(request_id=request_id):
                for role in self.roles:  # a role ignores ids it does not hold
                    await role.end(request_id, FinishReason.ABORT)
            case KVRelease(request_id=request_id):
                for role in self.roles:
                    await role.release(request_id)
            case KVStateRequest():
                if msg.reply:
                    await self.bus.publish(msg.reply, await self.kv_state())
            case RoleSwitch():
                if self.switcher is None:
                    if msg.reply:
                        await self._reply(msg.reply, InvalidRequest("this worker cannot switch"))
                    return
                await self.switcher.on_command(message, msg.reply, time.monotonic())

    async def _admit(self, request: GenerateRequest | PrefillRequest, reply_subject: str) -> None:
        role = self.role
        try:
            worker_id = self.context.worker_id
            if self.is_draining:
                raise Unavailable(f"worker {worker_id} is draining", retry_after_s=1.0)
            switching_to = self.switcher.target if self.switcher is not None else None
            if switching_to is not None:
                raise Unavailable(
                    f"worker {worker_id} is switching to {switching_to.name.lower()}",
                    retry_after_s=1.0,
                )
            if not isinstance(request, role.request_type):
                # The sender's directory is behind (the worker changed role): try another.
                raise Unavailable(
                    f"a {type(request).__name__} was sent to {worker_id}, a "
                    f"{role.kind.name.lower()} worker",
                    retry_after_s=1.0,
                )
            if any(request.request_id in live.in_flight for live in self.roles):
                raise InvalidRequest(f"request {request.request_id} is already running here")
            # Demand, whether or not it is admitted: the planner plans from its rate.
            prefills_here = role.prefills_here(request)
            self.num_arrived += 1
            if prefills_here:
                self.num_arrived_prefill_tokens += len(request.token_ids)
            max_waiting = self.config.max_waiting
            stats = self.loop.stats()
            if stats.num_waiting >= max_waiting:
                raise Overloaded(
                    f"worker {self.context.worker_id} has {max_waiting} requests waiting",
                    retry_after_s=1.0,
                )
            admission = self.objectives.admit(
                request,
                stats,
                self.loop.num_tokens_ahead(request.priority),
                time.monotonic(),
                prefills_here=prefills_here,
            )
            await role.admit(request, reply_subject, admission)
        except ServingError as exc:
            if reply_subject:
                await self._reply(reply_subject, exc)

    async def _reply(self, reply_subject: str, error: ServingError) -> None:
        """Answer a request with its error; a lost bus is logged (rate-limited), not raised."""
        try:
            await self.bus.publish_bytes(reply_subject, encode(error.to_reply()))
        except ServingError as exc:
            self.log.log("reply", "error reply not sent error=%s", exc)

    # --- engine steps --------------------------------------------------------------------------

    async def on_step(self, result: StepResult) -> None:
        """The engine loop's callback, outside its lock: KV events first (a router learns of
        the prompt's blocks no later than the client of its first token), then the outputs.
        A step whose outputs every role holds for a later message (``holds_output``) holds
        its KV events too: they stay in the engine and go out with that message's step."""
        self.canary.observe(result)
        budget = self.objectives.after_step(result, self.loop.stats())
        holds = self.roles.holds_output()
        try:
            if budget != self._budget_set or not holds:  # else nothing to do: no lock
                async with self.loop.exclusive() as engine:
                    engine.set_budget(budget)
                    self._budget_set = budget
                    if not holds:
                        await self._publish_kv_events(engine)
        except ServingError as exc:  # routers notice the gap and resync
            self.log.log("kv events", "KV events not published error=%s", exc)
        for role in self.roles:  # each takes the outputs of its own requests
            try:
                await role.deliver(result)
            except Exception as exc:
                # A bug or a lost bus: these requests cannot be served, the others still can.
                self.num_delivery_failures += 1
                logger.exception("step outputs not delivered num_outputs=%d", len(result.outputs))
                for out in result.outputs:
                    await role.end(out.request_id, FinishReason.ERROR, f"delivery failed: {exc}")

    async def publish_kv_events(self) -> None:
        """Publish the blocks stored and removed since the last call, numbered for gap checks."""
        async with self.loop.exclusive() as engine:
            await self._publish_kv_events(engine)

    async def kv_state(self) -> KVState:
        """Every cached block and the seq it reflects, consistent with the event stream:
        events not yet published are published first."""
        async with self.loop.exclusive() as engine:
            await self._publish_kv_events(engine)
            return KVState(
                worker_id=self.context.worker_id,
                seq=self._kv_event_seq,
                block_hashes=engine.cached_block_hashes(),
            )

    async def _publish_kv_events(self, engine: Engine) -> None:
        # Under the engine lock, so that events go out in the order the engine made them and
        # a KVState cannot overtake a batch taken before it.
        events = engine.take_kv_events()
        if not events:
            return
        self._kv_event_seq += 1
        await self.bus.publish(
            subjects.kv_events(self.context.namespace, self.context.worker_id),
            KVEventBatch(worker_id=self.context.worker_id, seq=self._kv_event_seq, events=events),
        )

    # --- load ----------------------------------------------------------------------------------

    def load_metrics(self) -> LoadMetrics:
        stats = self.loop.stats()
        objectives = self.objectives
        speed = objectives.speed_model.speed
        return LoadMetrics(
            worker_id=self.context.worker_id,
            num_running=stats.num_running + stats.num_reserved + self.num_handoffs,
            num_waiting=stats.num_waiting,
            num_free_blocks=stats.num_free_blocks,
            num_total_blocks=stats.num_total_blocks,
            kv_usage=stats.kv_usage,
            is_draining=self.is_draining,
            step_base_s=speed.base_s + speed.prefill_base_s,
            step_per_seq_s=speed.per_seq_s,
            step_per_token_s=speed.per_token_s,
            num_waiting_tokens=stats.num_waiting_tokens,
            predicted_wait_s=objectives.predicted_wait_s(stats, self.loop.num_tokens_ahead(0)),
            max_num_running=objectives.budget.max_num_running or 0,
            wait_per_token_s=objectives.wait_per_token_s(stats),
            max_waiting=self.config.max_waiting,
            num_awaiting_kv=stats.num_reserved + self.num_handoffs,
            num_arrived=self.num_arrived,
            num_arrived_prefill_tokens=self.num_arrived_prefill_tokens,
            num_finished=int(self.roles.count("baton_worker_finished_requests")),
            num_finished_output_tokens=int(self.roles.count("baton_worker_finished_output_tokens")),
        )

    async def publish_load(self) -> None:
        """Publish load metrics every ``load_interval_s`` until cancelled."""
        subject = subjects.load_metrics(self.context.namespace, self.context.worker_id)
        while True:
            try:
                await self.bus.publish(subject, self.load_metrics())
            except ServingError as exc:
                self.log.log("load", "load not published error=%s", exc)
            await asyncio.sleep(self.config.load_interval_s)

    # --- lifecycle -----------------------------------------------------------------------------

    async def serve(
        self,
        discovery: Discovery,
        info: WorkerInfo,
        card: ModelCard,
        stopping: asyncio.Event,
    ) -> None:
        """Run until ``stopping`` is set, then drain (see the module docstring)."""
        config = self.config
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self.loop.run(self.on_step), name="engine-loop"),
                tg.create_task(self.publish_load(), name="load"),
            ]
            self.roles.start(tg)
            await self.start()
            await discovery.put_model(config.namespace, card)
            self.info = info
            self._registration = registration = await discovery.register_worker(
                config.namespace, info, ttl_s=config.lease_ttl_s
            )
            self.is_registered = True
            gc.freeze()  # start-up objects live forever: keep them out of every collection
            logger.info("worker ready worker_id=%s role=%s", info.worker_id, info.role.name)
            await stopping.wait()
            logger.info("[shutdown] draining worker_id=%s", info.worker_id)
            draining_since = time.monotonic()
            self.is_draining = True  # no new work, and no switch after the one under way
            if self.switcher is not None:
                await self.switcher.close()  # a switch under way ends first (it is bounded)
            await registration.update(encode(msgspec.structs.replace(self.info, is_draining=True)))
            await self.drain(config.drain_timeout_s)
            await registration.revoke()
            await self.roles.close()
            for task in tasks:
                task.cancel()
            await self.bus.flush()
        logger.info(
            "[shutdown] worker stopped worker_id=%s drain_s=%.3f",
            info.worker_id,
            time.monotonic() - draining_since,
        )

    # --- role switching ------------------------------------------------------------------------

    async def reregister(self, role: WorkerRole) -> WorkerInfo:
        """Put this worker's entry again under ``role``: routers and frontends watching the
        directory send it that role's requests from now on. ``Unavailable`` if etcd does not
        take it (the new value is kept for the next re-registration)."""
        assert self.info is not None  # serve() registered
        assert self._registration is not None
        self.info = msgspec.structs.replace(self.info, role=role)
        await self._registration.update(encode(self.info))
        return self.info

    async def drain(self, timeout_s: float) -> None:
        """Refuse new work, let in-flight requests finish for up to ``timeout_s``, then end
        the rest with a reason (so no client stream hangs)."""
        self.is_draining = True
        await self.bus.publish(
            subjects.load_metrics(self.context.namespace, self.context.worker_id),
            self.load_metrics(),
        )
        try:
            async with asyncio.timeout(timeout_s):
                num_moved = await self.role.hand_off()
                if num_moved:
                    logger.info("[shutdown] streams moved to peers num_moved=%d", num_moved)
                await self.role.in_flight.idle.wait()
                await self.roles.wait_settled()  # retiring roles finish (or time out) too
        except TimeoutError:
            logger.warning(
                "[shutdown] drain deadline passed; ending num_requests=%d", self.num_in_flight
            )
            for role in self.roles:
                for request_id in role.in_flight:
                    await role.end(request_id, FinishReason.ABORT, "worker shut down")
