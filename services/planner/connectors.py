"""What a decision does: log it, tell the local launcher, or scale Kubernetes Deployments."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

from proto import subjects
from proto.messages import InstanceId, ScaleCommand, WorkerRole
from services.planner.config import PlannerConfig
from services.planner.policy import Decision
from services.planner.signals import Role
from shared.bus import Bus

logger = logging.getLogger(__name__)

KUBERNETES_NEEDS_EXTRA = (
    "the kubernetes connector needs lightkube, which the k8s extra installs: "
    "pip install 'baton[k8s]' (images: docker build --build-arg EXTRAS=k8s)"
)

WORKER_ROLE = {Role.DECODE: WorkerRole.DECODE, Role.PREFILL: WorkerRole.PREFILL}


class Connector(Protocol):
    """Carries each interval's decision for one pool to whatever runs the workers."""

    async def apply(self, role: Role, decision: Decision) -> None: ...


class DryRunConnector:
    """Logs each change of target; starts and stops nothing."""

    async def apply(self, role: Role, decision: Decision) -> None:
        if decision.is_change:
            logger.info(
                "dry run: would scale role=%s from=%d to=%d reason=%s detail=%s",
                role.value,
                decision.previous,
                decision.desired,
                decision.reason,
                decision.detail,
            )


class LocalConnector:
    """Publishes each change of target as a ``ScaleCommand`` on ``baton.<ns>.planner.scale``
    (``baton up --planner`` follows it). Only changes: a decision that keeps the pool as it
    is says nothing, so that a worker the launcher is restarting is not taken for one too
    many."""

    def __init__(self, bus: Bus, namespace: str, planner_id: str) -> None:
        self._bus = bus
        self._subject = subjects.planner_scale(namespace)
        self._planner_id = InstanceId(planner_id)
        self._seq = 0

    async def apply(self, role: Role, decision: Decision) -> None:
        if not decision.is_change:
            return
        self._seq += 1
        command = ScaleCommand(
            planner_id=self._planner_id,
            role=WORKER_ROLE[role],
            num_replicas=decision.desired,
            reason=f"{decision.reason}: {decision.detail}",
            seq=self._seq,
        )
        await self._bus.publish(self._subject, command)


@asynccontextmanager
async def open_connector(config: PlannerConfig, bus: Bus) -> AsyncIterator[Connector]:
    """The connector ``config.connector`` names, with what it holds closed on exit."""
    if config.connector == "dry-run":
        yield DryRunConnector()
    elif config.connector == "local":
        yield LocalConnector(bus, config.namespace, config.planner_id)
    elif config.connector == "kubernetes":
        # Imported here: lightkube is an extra, and the other connectors run without it.
        from services.planner.kubernetes import kubernetes_connector

        async with kubernetes_connector(config.k8s, config.limits()) as connector:
            yield connector
    else:
        raise ValueError(f"unknown connector {config.connector!r}")
