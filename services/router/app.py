"""The router's bus side: keep the index from KV events and load, answer RouteRequests."""

import asyncio
import logging
import time
from collections.abc import Mapping

import msgspec
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
    WorkerRole,
)
from shared.bus import Bus
from shared.codec import (
    encode,
    kv_event_batch_decoder,
    kv_state_decoder,
    load_metrics_decoder,
    route_request_decoder,
)
from shared.errors import InvalidRequest, NotFound, ServingError, Unavailable, from_reply
from shared.kv_hash import hash_prompt_blocks
from shared.routing.cost import RoutingPolicy
from shared.routing.router import Router
from shared.worker_pool import SERVING_ROLES

logger = logging.getLogger(__name__)

_DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2)


class RouterMetrics:
    def __init__(self, router: Router) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "baton_router_decisions",
            "routing decisions by pool and mode",
            ["pool", "mode"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "baton_router_decision_seconds",
            "time to answer one RouteRequest",
            buckets=_DECISION_BUCKETS,
            registry=self.registry,
        )
        self.resyncs = Counter(
            "baton_router_resyncs", "index resyncs after lost KV events", registry=self.registry
        )
        hit = Gauge(
            "baton_router_overlap_hit_rate",
            "cached prompt blocks on the chosen worker / prompt blocks, over all decisions",
            registry=self.registry,
        )
        hit.set_function(lambda: router.stats.hit_rate)
        entries = Gauge(
            "baton_router_index_entries",
            "(block, worker) entries in the index",
            registry=self.registry,
        )
        entries.set_function(lambda: router.index.num_entries)
        self.worker_load = Gauge(
            "baton_router_worker_kv_usage",
            "KV usage each worker last reported",
            ["worker"],
            registry=self.registry,
        )
        self.worker_decisions = Counter(
            "baton_router_worker_decisions",
            "decisions that chose each worker",
            ["worker"],
            registry=self.registry,
        )


class RouterService:
    """One router replica. Replicas fed the same events converge on the same index."""

    def __init__(
        self,
        bus: Bus,
        namespace: str,
        router: Router,
        *,
        prefill_policy: RoutingPolicy,
        resync_timeout_s: float,
    ) -> None:
        self._bus = bus
        self._namespace = namespace
        self.router = router
        self._prefill_policy = prefill_policy
        self._resync_timeout_s = resync_timeout_s
        self.metrics = RouterMetrics(router)
        self.workers: dict[InstanceId, WorkerInfo] = {}
        self.cards: dict[str, ModelCard] = {}
        self._resyncing: dict[InstanceId, asyncio.Task[None]] = {}
        self.num_unknown_worker_events = 0

    async def start(self) -> None:
        ns = self._namespace
        await self._bus.subscribe(subjects.kv_events_all(ns), self._on_kv_events)
        await self._bus.subscribe(subjects.load_metrics_all(ns), self._on_load)
        await self._bus.subscribe(
            subjects.router_requests(ns), self._on_route, queue=subjects.ROUTER_QUEUE
        )

    def sync_workers(self, items: Mapping[str, WorkerInfo]) -> None:
        """Take etcd's view of the workers; a worker whose lease is gone loses its blocks."""
        workers = {info.worker_id: info for info in items.values()}
        for gone in set(self.workers) - set(workers):
            self.router.remove_worker(gone)
            task = self._resyncing.pop(gone, None)
            if task is not None:
                task.cancel()
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
        if worker_id in self._resyncing:
            return
        task = asyncio.create_task(self._resync(worker_id), name=f"resync {worker_id}")
        self._resyncing[worker_id] = task
        task.add_done_callback(lambda _: self._resyncing.pop(worker_id, None))

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
        """Choose the decode (or aggregated) worker and, if the model has any, a prefill one."""
        card = self.cards.get(request.model)
        if card is None:
            raise NotFound(f"model {request.model!r} does not exist")
        hashes = hash_prompt_blocks(request.token_ids, card.kv_block_size)
        serving: list[InstanceId] = []
        prefill: list[InstanceId] = []
        for info in self.workers.values():
            if info.model != request.model or info.is_draining:
                continue
            if info.role in SERVING_ROLES:
                serving.append(info.worker_id)
            elif info.role is WorkerRole.PREFILL:
                prefill.append(info.worker_id)
        if not serving:
            raise Unavailable(f"no live worker serves model {request.model!r}")
        decision = self.router.route(hashes, serving)
        self.metrics.decisions.labels("decode", decision.mode.value).inc()
        self.metrics.worker_decisions.labels(decision.worker_id).inc()
        result = RouteDecision(
            request_id=request.request_id,
            worker_id=decision.worker_id,
            decode_cached_tokens=decision.overlap_blocks * card.kv_block_size,
        )
        if prefill:
            # Not recorded as load: the decode worker may still prefill locally.
            chosen = self.router.route(hashes, prefill, policy=self._prefill_policy, record=False)
            self.metrics.decisions.labels("prefill", chosen.mode.value).inc()
            result = msgspec.structs.replace(
                result,
                prefill_worker_id=chosen.worker_id,
                prefill_cached_tokens=chosen.overlap_blocks * card.kv_block_size,
            )
        return result
