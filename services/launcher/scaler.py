"""`baton up --planner`: the launcher's side of the planner's ``local`` connector.

The planner publishes a ``ScaleCommand`` (a target number of workers for one pool) when a
target changes, on ``baton.<ns>.planner.scale``. :class:`WorkerScaler` keeps the latest target
of each pool it runs (decode, and prefill when the cluster has a prefill pool), bounded by the
pool's ``[min_workers, max_workers]``, and reconciles: it starts a worker of that role while
there are fewer, and retires one (SIGTERM: it drains, moving its streams to a peer, and exits
0) while there are more. The cluster supplies how to count, start and retire a pool's workers
(counted by the role each worker is registered with now, so a worker the planner switched to
the other role counts there); this module knows nothing of processes.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.msg import Msg

from proto import subjects
from proto.messages import ScaleCommand, WorkerRole
from shared.bus import Bus
from shared.codec import scale_command_decoder
from shared.security import BusSecurity

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ScaledPool:
    """One role's workers as the launcher runs them."""

    role: WorkerRole
    min_workers: int
    max_workers: int
    count: Callable[[], int]
    start: Callable[[], Awaitable[None]]
    retire: Callable[[], Awaitable[None]]
    target: int | None = None  # none until the planner says

    def __post_init__(self) -> None:
        if not 0 <= self.min_workers <= self.max_workers:
            raise ValueError(
                f"need 0 <= min_workers <= max_workers for {self.role.name.lower()}, "
                f"got {self.min_workers} and {self.max_workers}"
            )


class WorkerScaler:
    def __init__(self, pools: list[ScaledPool]) -> None:
        self.pools = {pool.role: pool for pool in pools}
        self._changed = asyncio.Event()
        self._commanded: set[WorkerRole] = set()  # pools with a command not yet reconciled
        self._ignored_roles: set[WorkerRole] = set()

    def on_command(self, command: ScaleCommand) -> None:
        """Take a new target for its pool (the latest wins)."""
        pool = self.pools.get(command.role)
        if pool is None:
            if command.role not in self._ignored_roles:
                self._ignored_roles.add(command.role)
                logger.warning(
                    "scale command ignored role=%s: this cluster has no such pool to scale",
                    command.role.name.lower(),
                )
            return
        target = max(pool.min_workers, min(pool.max_workers, command.num_replicas))
        # Reconciled even when the target is the one it had: the pool may have moved since
        # (a role switch), and the planner commands a pool only when its target changes.
        self._commanded.add(command.role)
        self._changed.set()
        if target != pool.target:
            logger.info(
                "scale target role=%s workers=%d asked=%d seq=%d reason=%s",
                command.role.name.lower(),
                target,
                command.num_replicas,
                command.seq,
                command.reason,
            )
            pool.target = target

    async def reconcile(self) -> None:
        """Start or retire workers, one at a time, until each pool commanded since the last
        reconcile has its target. Only those: a pool's old target may be stale (a role switch
        moved a worker out of it without a command), and acting on it would start or retire
        a worker the planner did not ask for."""
        while self._commanded:
            pool = self.pools[self._commanded.pop()]
            while pool.target is not None and pool.count() < pool.target:
                await pool.start()
            while pool.target is not None and pool.count() > pool.target:
                await pool.retire()

    async def follow(self, namespace: str, nats_url: str, security: BusSecurity) -> None:
        """Subscribe to the planner's commands and reconcile after each change, until
        cancelled."""

        async def on_message(msg: Msg) -> None:
            self.on_command(scale_command_decoder.decode(msg.data))

        async with Bus.connect(nats_url, name="launcher", security=security) as bus:
            await bus.subscribe(subjects.planner_scale(namespace), on_message)
            while True:
                await self._changed.wait()
                self._changed.clear()
                await self.reconcile()
