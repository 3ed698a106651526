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
from services.router.metrics import RouterMetrics
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
from shared.routing.cost import RoutingPolicy
from shared.routing.disagg import DisaggPolicy
from shared.routing.placement import place
from shared.routing.router import Router

logger = logging.getLogger(__name__)


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
        self.metrics = RouterMetrics(router)
        self.workers: dict[InstanceId, WorkerInfo] = {}
        self.cards: dict[str, ModelCard] = {}
        # Each task leaves the dict when it ends (also when cancelled): close() awaits them all.
        self._resyncing: dict[InstanceId, asyncio.Task[None]] = {}
        self._is_closed = False
        self.num_unknown_worker_events = 0

    async def start(self) -> None:
        ns = self._namespace
        await self._bus.subscribe(subjects.kv_events_all(ns), self._on_kv_events)
        await self._bus.subscribe(subjects.load_metrics_all(ns), self._on_load)
        await self._bus.subscribe(
            subjects.router_requests(ns), self._on_route, queue=subjects.ROUTER_QUEUE
        )

    async def close(self) -> None:
        """Cancel the resyncs in flight and wait for them; start no more. Safe to call twice."""
        self._is_closed = True
        tasks = list(self._resyncing.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def sync_workers(self, items: Mapping[str, WorkerInfo]) -> None:
        """Take etcd's view of the workers; a worker whose lease is gone loses its blocks."""
        workers = {info.worker_id: info for info in items.values()}
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
        try:
            batch = kv_event_batch_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            logger.warning("bad KV events subject=%s error=%s", msg.subject, exc)
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
            logger.warning("resync failed worker_id=%s error=%s", worker_id, exc)
            return
        if isinstance(state, ErrorReply):
            logger.warning("resync refused worker_id=%s error=%s", worker_id, from_reply(state))
            return
        self._apply_state(worker_id, state)

    def _apply_state(self, worker_id: InstanceId, state: KVState) -> None:
        if worker_id not in self.workers:
            return
        self.router.resync(worker_id, state.block_hashes, state.seq)
        self.metrics.resyncs.inc()
        logger.info(
            "index resynced worker_id=%s num_blocks=%d seq=%d",
            worker_id,
            len(state.block_hashes),
            state.seq,
        )

    async def _on_load(self, msg: Msg) -> None:
        try:
            load = load_metrics_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            logger.warning("bad load metrics subject=%s error=%s", msg.subject, exc)
            return
        if load.worker_id in self.workers:
            self.router.update_load(load)
            self.metrics.worker_load.labels(load.worker_id).set(load.kv_usage)

    async def _on_route(self, msg: Msg) -> None:
        started = time.perf_counter()
        try:
            request = route_request_decoder.decode(msg.data)
            reply: RouteDecision | ErrorReply = self.route(request)
        except msgspec.DecodeError as exc:
            reply = InvalidRequest(f"malformed RouteRequest: {exc}").to_reply()
        except ServingError as exc:
            reply = exc.to_reply()
        if msg.reply:
            await self._bus.publish_bytes(msg.reply, encode(reply))
        self.metrics.latency.observe(time.perf_counter() - started)

    def route(self, request: RouteRequest) -> RouteDecision:
        """Place the request: its decode (or aggregated) worker and, when its prefill should
        run remotely, a prefill worker (``shared.routing.placement.place``)."""
        card = self.cards.get(request.model)
        if card is None:
            raise NotFound(f"model {request.model!r} does not exist")
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
