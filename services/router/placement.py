"""The router's bus side: keep the index from KV events and load, place each RouteRequest."""

import asyncio
import logging
import time
from collections.abc import Mapping

import msgspec
from nats.aio.msg import Msg

from proto import subjects
from proto.messages import (
    ErrorReply,
    InstanceId,
    KVState,
    KVStateRequest,
    ModelCard,
    RouteDecision,
    RouteRequest,
    WorkerInfo,
)
from services.router.metrics import CounterSample, RouterMetrics
from shared.bus import Bus
from shared.codec import (
    encode,
    kv_event_batch_decoder,
    kv_state_decoder,
    load_metrics_decoder,
    route_request_decoder,
)
from shared.errors import InvalidRequest, NotFound, ServingError, from_reply
from shared.kv_hash import hash_prompt_blocks
from shared.logs import BadMessages, RateLimitedLog
from shared.routing.cost import RoutingPolicy
from shared.routing.disagg import DisaggPolicy
from shared.routing.placement import place
from shared.routing.router import Router

logger = logging.getLogger(__name__)

_INT64_END = 2**63


class PlacementService:
    """One router replica. Replicas fed the same events converge on the same index."""

    def __init__(
        self,
        bus: Bus,
        namespace: str,
        router: Router,
        *,
        prefill_policy: RoutingPolicy,
        disagg: DisaggPolicy,
        resync_timeout_s: float,
    ) -> None:
        self._bus = bus
        self._namespace = namespace
        self.router = router
        self._prefill_policy = prefill_policy
        self._disagg = disagg
        self._resync_timeout_s = resync_timeout_s
        self.workers: dict[InstanceId, WorkerInfo] = {}
        self.cards: dict[str, ModelCard] = {}
        # Each task leaves the dict when it ends (also when cancelled): close() awaits them all.
        self._resyncing: dict[InstanceId, asyncio.Task[None]] = {}
        self._is_closed = False
        self.num_unknown_worker_events = 0
        self.log = RateLimitedLog(logger)
        self._resync_log = RateLimitedLog(logger, level=logging.INFO)
        self.bad_kv_events = BadMessages(self.log, "KV events")
        self.bad_loads = BadMessages(self.log, "load metrics")
        self.bad_routes = BadMessages(self.log, "RouteRequest")
        self.is_started = False
        self.metrics = RouterMetrics(router, self._counters)
        self.metrics.gauge("baton_router_workers", "workers registered", lambda: len(self.workers))
        self.metrics.gauge("baton_router_models", "models registered", lambda: len(self.cards))
        self.metrics.gauge(
            "baton_router_resyncs_in_flight",
            "index resyncs under way",
            lambda: len(self._resyncing),
        )

    async def start(self) -> None:
        ns = self._namespace
        await self._bus.subscribe(subjects.kv_events_all(ns), self._on_kv_events)
        await self._bus.subscribe(subjects.load_metrics_all(ns), self._on_load)
        await self._bus.subscribe(
            subjects.router_requests(ns), self._on_route, queue=subjects.ROUTER_QUEUE
        )
        self.is_started = True

    @property
    def is_connected(self) -> bool:
        return self._bus.is_connected

    def _counters(self) -> list[CounterSample]:
        return [
            (
                "baton_router_unknown_worker_events",
                "KV event batches from workers not (or no longer) registered",
                self.num_unknown_worker_events,
            ),
            (
                "baton_router_bad_kv_events",
                "undecodable KV event batches",
                self.bad_kv_events.num_bad,
            ),
            ("baton_router_bad_load_metrics", "undecodable load reports", self.bad_loads.num_bad),
            (
                "baton_router_bad_route_requests",
                "undecodable RouteRequests",
                self.bad_routes.num_bad,
            ),
            (
                "baton_router_log_lines_suppressed",
                "warnings left out by rate limiting",
                self.log.num_suppressed + self._resync_log.num_suppressed,
            ),
        ]

    async def close(self) -> None:
        """Cancel the resyncs in flight and wait for them; start no more. Safe to call twice."""
        self._is_closed = True
        tasks = list(self._resyncing.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def sync_workers(self, items: Mapping[str, WorkerInfo]) -> None:
        """Take etcd's view of the workers; a worker whose lease is gone loses its blocks, one
        that changed role keeps them."""
        workers = {info.worker_id: info for info in items.values()}
        for worker_id, info in workers.items():
            known = self.workers.get(worker_id)
            if known is not None and known.role is not info.role:
                # A role switch: same engine, same cache, so its blocks stay; placement reads
                # the role from ``self.workers`` each time and follows at once.
                logger.info(
                    "worker changed role worker_id=%s from=%s to=%s",
                    worker_id,
                    known.role.name.lower(),
                    info.role.name.lower(),
                )
        for gone in set(self.workers) - set(workers):
            self.router.remove_worker(gone)
            task = self._resyncing.get(gone)
            if task is not None:
                task.cancel()  # it leaves _resyncing once it has ended
            logger.info("worker left; its blocks dropped worker_id=%s", gone)
        self.workers = workers

    def sync_models(self, items: Mapping[str, ModelCard]) -> None:
        self.cards = {card.name: card for card in items.values()}

    async def _on_kv_events(self, msg: Msg) -> None:
        batch = self.bad_kv_events.decode(kv_event_batch_decoder, msg.data, msg.subject)
        if batch is None:
            return
        if batch.worker_id not in self.workers:
            self.num_unknown_worker_events += 1  # not registered yet, or already gone
            return
        if self.router.apply(batch.worker_id, batch).needs_resync:
            self._start_resync(batch.worker_id)

    def _start_resync(self, worker_id: InstanceId) -> None:
        if self._is_closed or worker_id in self._resyncing:
            return
        task = asyncio.create_task(self._resync(worker_id), name=f"resync {worker_id}")
        self._resyncing[worker_id] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._resyncing.get(worker_id) is done:
                del self._resyncing[worker_id]

        task.add_done_callback(forget)

    async def _resync(self, worker_id: InstanceId) -> None:
        """Rebuild a worker's blocks from its own state after lost events."""
        info = self.workers.get(worker_id)
        if info is None:
            return
        try:
            data = await self._bus.request(
                info.subject, KVStateRequest(), timeout_s=self._resync_timeout_s
            )
            state = kv_state_decoder.decode(data)
        except (ServingError, msgspec.DecodeError) as exc:
            self.log.log("resync failed", "resync failed worker_id=%s error=%s", worker_id, exc)
            return
        if isinstance(state, ErrorReply):
            error = from_reply(state)
            self.log.log("resync refused", "resync refused worker_id=%s error=%s", worker_id, error)
            return
        self._apply_state(worker_id, state)

    def _apply_state(self, worker_id: InstanceId, state: KVState) -> None:
        if worker_id not in self.workers:
            return
        self.router.resync(worker_id, state.block_hashes, state.seq)
        self.metrics.resyncs.inc()
        self._resync_log.log(
            "resynced",
            "index resynced worker_id=%s num_blocks=%d seq=%d",
            worker_id,
            len(state.block_hashes),
            state.seq,
        )

    async def _on_load(self, msg: Msg) -> None:
        load = self.bad_loads.decode(load_metrics_decoder, msg.data, msg.subject)
        if load is None:
            return
        if load.worker_id in self.workers:
            self.router.update_load(load)
            self.metrics.worker_load.labels(load.worker_id).set(load.kv_usage)

    async def _on_route(self, msg: Msg) -> None:
        started = time.perf_counter()
        request = self.bad_routes.decode_or_error(route_request_decoder, msg.data, msg.subject)
        reply: RouteDecision | ErrorReply
        try:
            if isinstance(request, InvalidRequest):
                raise request
            reply = self.route(request)
        except ServingError as exc:
            reply = exc.to_reply()
        if msg.reply:
            try:
                await self._bus.publish_bytes(msg.reply, encode(reply))
            except ServingError as exc:
                self.log.log("reply", "route reply not sent error=%s", exc)
        self.metrics.latency.observe(time.perf_counter() - started)

    def route(self, request: RouteRequest) -> RouteDecision:
        """Place the request: its decode (or aggregated) worker and, when its prefill should
        run remotely, a prefill worker (``shared.routing.placement.place``)."""
        card = self.cards.get(request.model)
        if card is None:
            raise NotFound(f"model {request.model!r} does not exist")
        check_prompt(request.token_ids, card)
        placement = place(
            self.router,
            self.workers.values(),
            request.model,
            hash_prompt_blocks(request.token_ids, card.kv_block_size),
            len(request.token_ids),
            block_size=card.kv_block_size,
            disagg=self._disagg,
            prefill_policy=self._prefill_policy,
        )
        metrics = self.metrics
        decode = placement.decode
        metrics.decisions.labels("decode", decode.mode.value).inc()
        metrics.worker_decisions.labels(decode.worker_id).inc()
        prefill = placement.prefill
        if prefill is None:
            metrics.prefill_placements.labels("local").inc()
            prefill_worker_id = None
        else:
            metrics.prefill_placements.labels("remote").inc()
            metrics.decisions.labels("prefill", prefill.mode.value).inc()
            metrics.worker_decisions.labels(prefill.worker_id).inc()
            prefill_worker_id = prefill.worker_id
        return RouteDecision(
            request_id=request.request_id,
            worker_id=decode.worker_id,
            decode_cached_tokens=placement.num_decode_cached_tokens,
            prefill_worker_id=prefill_worker_id,
        )


def check_prompt(token_ids: list[int], card: ModelCard) -> None:
    """Refuse, before hashing it, a prompt no worker could serve: longer than the model's
    context, or with token ids that are not int64s (the block hash packs them as such)."""
    if len(token_ids) > card.context_length:
        raise InvalidRequest(
            f"prompt has {len(token_ids)} tokens; {card.name} takes at most {card.context_length}"
        )
    if token_ids and (min(token_ids) < 0 or max(token_ids) >= _INT64_END):
        raise InvalidRequest(
            f"token ids must be in [0, 2**63); got {min(token_ids)} to {max(token_ids)}"
        )
