"""The planner's loop: hear the workers' load, decide every interval, hand on the decision."""

import asyncio
import logging
import time

from nats.aio.msg import Msg

from services.planner.config import PlannerConfig
from services.planner.connectors import Connector
from services.planner.metrics import PlannerMetrics
from services.planner.observer import PoolObserver
from services.planner.policy import Decision, PoolPlanner
from services.planner.signals import Role
from shared.codec import load_metrics_decoder

logger = logging.getLogger(__name__)


class Planner:
    """One :class:`PoolPlanner` per planned pool, fed by a :class:`PoolObserver`."""

    def __init__(self, config: PlannerConfig, connector: Connector) -> None:
        self.config = config
        self.connector = connector
        self.observer = PoolObserver(config.report_stale_s)
        self.metrics = PlannerMetrics()
        policy = config.policy()
        self.pools = {role: PoolPlanner(policy, limits) for role, limits in config.limits().items()}
        self.last_decisions: dict[Role, Decision] = {}
        self.is_started = False

    async def on_load(self, msg: Msg) -> None:
        self.observer.record(load_metrics_decoder.decode(msg.data), time.monotonic())

    def decide(self, now_s: float) -> dict[Role, Decision]:
        """One decision per pool, counted in the metrics and logged when it changes."""
        decisions = {}
        for role, pool in self.pools.items():
            view = self.observer.view(role, now_s)
            decision = pool.decide(view, now_s)
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
        return decisions

    async def run(self) -> None:
        """Decide every ``interval_s`` until cancelled. The first decision waits one interval,
        so that every worker has reported."""
        while True:
            await asyncio.sleep(self.config.interval_s)
            for role, decision in self.decide(time.monotonic()).items():
                await self.connector.apply(role, decision)
