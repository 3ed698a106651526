"""`baton up --planner`: the launcher's side of the planner's ``local`` connector.

The planner publishes a ``ScaleCommand`` (a target number of workers per pool) every interval
on ``baton.<ns>.planner.scale``. :class:`WorkerScaler` keeps the latest target for the decode
pool, bounded by ``[min_workers, max_workers]``, and reconciles: it starts a decode worker
(the same command line as the others) while there are fewer, and retires one (SIGTERM: it
drains, finishes its requests and exits 0) while there are more. The cluster supplies how to
count, start and retire workers; this module knows nothing of processes. Prefill targets are
logged and ignored: this slice scales the decode pool only.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg

from proto import subjects
from proto.messages import ScaleCommand, WorkerRole
from shared.bus import Bus
from shared.codec import scale_command_decoder
from shared.security import BusSecurity

logger = logging.getLogger(__name__)


class WorkerScaler:
    def __init__(
        self,
        *,
        min_workers: int,
        max_workers: int,
        count: Callable[[], int],
        start: Callable[[], Awaitable[None]],
        retire: Callable[[], Awaitable[None]],
    ) -> None:
        if not 1 <= min_workers <= max_workers:
            raise ValueError(
                f"need 1 <= min_workers <= max_workers, got {min_workers} and {max_workers}"
            )
        self.min_workers = min_workers
        self.max_workers = max_workers
        self.target: int | None = None  # none until the planner says
        self._count = count
        self._start = start
        self._retire = retire
        self._changed = asyncio.Event()
        self._ignored_roles: set[WorkerRole] = set()

    def on_command(self, command: ScaleCommand) -> None:
        """Take a new target (the latest wins)."""
        if command.role is not WorkerRole.DECODE:
            if command.role not in self._ignored_roles:
                self._ignored_roles.add(command.role)
                logger.warning(
                    "scale command ignored role=%s: baton up scales decode workers only",
                    command.role.name.lower(),
                )
            return
        target = max(self.min_workers, min(self.max_workers, command.num_replicas))
        if target != self.target:
            logger.info(
                "scale target decode workers=%d asked=%d seq=%d reason=%s",
                target,
                command.num_replicas,
                command.seq,
                command.reason,
            )
            self.target = target
            self._changed.set()

    async def reconcile(self) -> None:
        """Start or retire decode workers, one at a time, until their count is the target."""
        while self.target is not None and self._count() < self.target:
            await self._start()
        while self.target is not None and self._count() > self.target:
            await self._retire()

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
