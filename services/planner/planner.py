"""The planner's loop: hear the workers' load, decide every interval, hand on the decision:
a role switch (to a worker, over the bus) when one pool can give another a worker, else each
pool's target to the connector."""

import asyncio
import logging
import time
from dataclasses import replace

import msgspec
from nats.aio.msg import Msg

from proto.messages import ErrorReply, InstanceId, RoleSwitch
from services.planner.config import PlannerConfig
from services.planner.connectors import WORKER_ROLE, Connector
from services.planner.metrics import PlannerMetrics
from services.planner.observer import PoolObserver
from services.planner.policy import Decision, PoolPlanner, Switch, choose_worker, plan_switch
from services.planner.signals import PoolView, Role, shed_pools, with_local_prefill
from shared.bus import Bus
from shared.codec import frontend_load_decoder, load_metrics_decoder, role_switch_reply_decoder
from shared.errors import ServingError, from_reply

logger = logging.getLogger(__name__)


class Planner:
    """One :class:`PoolPlanner` per planned pool, fed by a :class:`PoolObserver`. ``bus``
    carries role switches (None: none are sent, as in a dry run)."""

    def __init__(self, config: PlannerConfig, connector: Connector, bus: Bus | None = None) -> None:
        self.config = config
        self.connector = connector
        self.bus = bus
        self.observer = PoolObserver(config.report_stale_s)
        self.metrics = PlannerMetrics()
        policy = config.policy()
        self._thresholds = policy.thresholds
        self._wait_budget_s = policy.wait_budget_s
        # A source pool gives a worker after reading under this long (an action resets a
        # streak, so never longer than the down streak it would act on).
        self.min_spare_streak = min(policy.up_intervals, policy.down_intervals)
        self.limits = config.limits()
        self.pools = {role: PoolPlanner(policy, limits) for role, limits in self.limits.items()}
        self.last_decisions: dict[Role, Decision] = {}
        self.last_views: dict[Role, PoolView] = {}
        self.is_started = False
        self._switch_seq = 0

    async def on_load(self, msg: Msg) -> None:
        self.observer.record(load_metrics_decoder.decode(msg.data), time.monotonic())

    async def on_frontend_load(self, msg: Msg) -> None:
        self.observer.record_frontend(frontend_load_decoder.decode(msg.data), time.monotonic())

    def decide(self, now_s: float) -> dict[Role, Decision]:
        """One decision per pool, counted in the metrics and logged when it changes. With
        ``--max-total-workers``, a pool may grow only into what the other leaves; with
        ``--min-total-workers``, shrink only by what the other has above it."""
        views = {role: self.observer.view(role, now_s) for role in self.pools}
        if Role.PREFILL in views:  # an empty prefill pool: its work waits on decode workers
            views[Role.DECODE], views[Role.PREFILL] = with_local_prefill(
                views[Role.DECODE],
                views[Role.PREFILL],
                self._thresholds,
            )
        elif Role.DECODE in views:  # no prefill pool at all: the decode workers prefill
            views[Role.DECODE] = replace(views[Role.DECODE], prefills_locally=True)
        shed = self.observer.shed_fraction(now_s)
        if shed > 0:
            max_wait_fraction = self._thresholds.max_wait_fraction
            for role in shed_pools(views, self._wait_budget_s, max_wait_fraction):
                views[role] = replace(views[role], shed_fraction=shed)
        # The total as planned: each pool's target (a step not yet registered counts), and,
        # once a pool has decided this interval, its new one, so that two pools never both
        # step into the same room under the cap (or the same room over the floor).
        targets = {
            role: views[role].num_workers if pool.desired is None else pool.desired
            for role, pool in self.pools.items()
        }
        cap, floor = self.config.max_total_workers, self.config.min_total_workers
        decisions = {}
        for role, pool in self.pools.items():
            view = views[role]
            num_total = sum(targets.values())
            max_total = min_total = None
            if cap:
                max_total = max(view.num_workers, view.num_workers + cap - num_total)
            if floor:
                min_total = min(view.num_workers, view.num_workers + floor - num_total)
            decision = pool.decide(view, now_s, max_total, min_total)
            targets[role] = decision.desired
            self.metrics.observe(role, view, decision)
            level = logging.INFO if decision.is_change else logging.DEBUG
            logger.log(
                level,
                "decision role=%s workers=%d desired=%d previous=%d reason=%s detail=%s",
                role.value,
                view.num_workers,
                decision.desired,
                decision.previous,
                decision.reason,
                decision.detail,
            )
            decisions[role] = decision
        self.last_decisions = decisions
        self.last_views = views
        return decisions

    def plan_switch(self) -> Switch | None:
        """The role switch the last decisions call for, if switching is on."""
        if not self.config.switches_roles:
            return None
        return plan_switch(self.last_decisions, self.last_views, self.limits, self.min_spare_streak)

    async def step(self, now_s: float) -> None:
        """One interval: decide, then switch a worker's role or apply the decisions."""
        decisions = self.decide(now_s)
        switch = self.plan_switch()
        if switch is not None and await self.switch(switch, now_s):
            return
        for role, decision in decisions.items():
            await self.connector.apply(role, decision)
            self.metrics.applied(role, decision)

    async def switch(self, switch: Switch, now_s: float) -> bool:
        """Ask one worker of ``switch.source`` to become a ``switch.target`` worker and wait
        for its answer (up to ``--switch-timeout-s``). True when it switched (both pools'
        targets move by one; the connector does nothing this interval) or in a dry run; False
        when no worker could or would (the connector gets the decisions instead)."""
        source, target = switch.source.value, switch.target.value
        candidates = self.observer.candidates(switch.source, now_s)
        worker_id = choose_worker(candidates, switch.target)
        if worker_id is None:
            logger.info(
                "role switch: no %s worker fits (none reported lately%s) to=%s",
                source,
                ", or none can prefill" if target == "prefill" else "",
                target,
            )
            return False
        if self.bus is None or self.config.connector == "dry-run":
            logger.info(
                "dry run: would switch worker_id=%s from=%s to=%s reason=%s",
                worker_id,
                source,
                target,
                switch.detail,
            )
            return True
        self._switch_seq += 1
        command = RoleSwitch(
            planner_id=InstanceId(self.config.planner_id),
            worker_id=worker_id,
            role=WORKER_ROLE[switch.target],
            reason=switch.detail,
            seq=self._switch_seq,
        )
        logger.info(
            "role switch worker_id=%s from=%s to=%s seq=%d reason=%s",
            worker_id,
            source,
            target,
            command.seq,
            switch.detail,
        )
        try:
            info = self.observer.workers[worker_id]
            data = await self.bus.request(
                info.subject, command, timeout_s=self.config.switch_timeout_s
            )
            reply = role_switch_reply_decoder.decode(data)
            if isinstance(reply, ErrorReply):
                raise from_reply(reply)
        except (ServingError, msgspec.DecodeError, KeyError) as exc:
            self.metrics.switch_failures.labels(source, target).inc()
            logger.warning(
                "role switch not done worker_id=%s from=%s to=%s seq=%d error=%s",
                worker_id,
                source,
                target,
                command.seq,
                exc,
            )
            return False
        self.pools[switch.source].note_switch(-1, now_s)
        self.pools[switch.target].note_switch(+1, now_s)
        desired = {role: pool.desired or 0 for role, pool in self.pools.items()}
        self.metrics.switched(switch, reply.switch_s, desired)
        logger.info(
            "role switched worker_id=%s from=%s to=%s switch_s=%.3f num_moved=%d seq=%d",
            worker_id,
            source,
            target,
            reply.switch_s,
            reply.num_moved,
            command.seq,
        )
        return True

    async def run(self) -> None:
        """Decide every ``interval_s`` until cancelled. The first decision waits one interval,
        so that every worker has reported."""
        while True:
            await asyncio.sleep(self.config.interval_s)
            await self.step(time.monotonic())
