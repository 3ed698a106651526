"""What a decision does: log it, or tell the local launcher; Kubernetes is not built yet."""

import logging
from typing import Protocol

from proto import subjects
from proto.messages import InstanceId, ScaleCommand, WorkerRole
from services.planner.policy import Decision
from services.planner.signals import Role
from shared.bus import Bus

logger = logging.getLogger(__name__)

KUBERNETES_NOT_BUILT = (
    "the kubernetes connector is not built yet (it would set the workers' Deployment "
    "replicas); use --connector dry-run or local"
)

_WORKER_ROLE = {Role.DECODE: WorkerRole.DECODE, Role.PREFILL: WorkerRole.PREFILL}


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
            role=_WORKER_ROLE[role],
            num_replicas=decision.desired,
            reason=f"{decision.reason}: {decision.detail}",
            seq=self._seq,
        )
        await self._bus.publish(self._subject, command)


def make_connector(name: str, bus: Bus, namespace: str, planner_id: str) -> Connector:
    """The connector ``name`` (see ``PlannerConfig.connector``)."""
    if name == "dry-run":
        return DryRunConnector()
    if name == "local":
        return LocalConnector(bus, namespace, planner_id)
    if name == "kubernetes":
        raise NotImplementedError(KUBERNETES_NOT_BUILT)
    raise ValueError(f"unknown connector {name!r}")
