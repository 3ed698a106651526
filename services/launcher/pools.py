"""A cluster's worker pools as the planner sizes them (``ClusterSpec.planner``).

:class:`WorkerPools` follows the planner's scale commands (``scaler.py``) for the cluster: it
starts decode and prefill workers as the cluster's children (a new decode worker is a warm
standby handed its assignment, ``standby.py``, when one is ready) and retires the newest of a
pool by SIGTERM. The cluster (``cluster.py``) supplies how to start a child and how to
supervise one; this module keeps the pools' names, standbys and retired workers.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from proto.messages import WorkerRole
from services.launcher.processes import Child, stop_process
from services.launcher.scaler import ScaledPool, WorkerScaler
from services.launcher.spec import ClusterSpec
from services.launcher.standby import ExecChild, StandbyPool, StandbyWorker, worker_command
from shared.config import load_config
from shared.discovery import Discovery
from shared.security import ClusterSecurity

logger = logging.getLogger(__name__)

# How the cluster starts a child cold: (name, role, arguments) -> the child, in its children.
SpawnChild = Callable[[str, str, list[str]], Awaitable[Child]]
# How the cluster supervises a child: until cancelled, or until the child is retired.
SuperviseChild = Callable[[Child], Coroutine[Any, Any, None]]


class WorkerPools:
    """The cluster's decode and prefill pools, following the planner. ``children`` and
    ``started_at`` are the cluster's own (its children, and when each was started)."""

    def __init__(
        self,
        spec: ClusterSpec,
        children: list[Child],
        started_at: dict[str, float],
        *,
        spawn: SpawnChild,
        exec_child: ExecChild,
        supervise: SuperviseChild,
    ) -> None:
        self.spec = spec
        self.retired: list[Child] = []  # decode workers retired at the planner's request
        self.standbys: StandbyPool | None = None  # with the planner, once it is followed
        self._children = children
        self._started_at = started_at
        self._spawn = spawn
        self._exec = exec_child
        self._supervise_child = supervise
        self._num_decode_started = spec.num_workers
        self._num_prefill_started = spec.num_prefill_workers

    async def follow(
        self,
        tg: asyncio.TaskGroup,
        *,
        namespace: str,
        nats_url: str,
        etcd_url: str,
        env: dict[str, str],
    ) -> None:
        """Start and retire workers as the planner's scale commands say. A worker counts in
        the pool of the role it is registered with now (the planner may have switched it),
        or, until it registers, of the role it was started with."""
        security = load_config(ClusterSecurity, "up", [], env=env)
        async with (
            Discovery.connect(etcd_url, security=security.etcd) as discovery,
            discovery.watch_workers(namespace) as directory,
        ):

            def live(role: str) -> list[Child]:
                registered = {
                    info.pid: info.role.name.lower() for info in directory.workers.values()
                }
                return [
                    c
                    for c in self._children
                    if c.role in ("decode", "prefill")
                    and registered.get(c.proc.pid, c.role) == role
                    and not c.is_retiring
                    and (self.spec.supervise or c.proc.returncode is None)
                ]

            decode_args = ["--role", "decode", *self.spec.decode_args]
            if self.spec.num_standby_workers:
                self.standbys = StandbyPool(
                    size=self.spec.num_standby_workers,
                    worker_args=decode_args,
                    exec_child=self._exec,
                    next_name=self._next_decode_name,
                    backoff_s=self.spec.restart_backoff_s,
                    backoff_max_s=self.spec.restart_backoff_max_s,
                    stop_timeout_s=self.spec.stop_timeout_s,
                )
                tg.create_task(self.standbys.run(), name="standby workers")

            async def start_decode() -> None:
                standby = self.standbys.take() if self.standbys is not None else None
                child = await self._hand_over(standby, decode_args) if standby else None
                if child is None:
                    child = await self._spawn(self._next_decode_name(), "decode", decode_args)
                if self.spec.supervise:
                    tg.create_task(self._supervise_child(child), name=f"supervise {child.name}")

            async def start_prefill() -> None:
                name = f"prefill-{self._num_prefill_started}"
                self._num_prefill_started += 1
                args = ["--role", "prefill", *self.spec.prefill_args]
                child = await self._spawn(name, "prefill", args)
                if self.spec.supervise:
                    tg.create_task(self._supervise_child(child), name=f"supervise {child.name}")

            def retire(role: str) -> Callable[[], Awaitable[None]]:
                async def retire_newest() -> None:
                    child = live(role)[-1]
                    child.is_retiring = True
                    logger.info(
                        "retiring %s pid=%d (SIGTERM: it drains)", child.name, child.proc.pid
                    )
                    tg.create_task(self._retire(child), name=f"retire {child.name}")

                return retire_newest

            def pool(
                role: WorkerRole, least: int, most: int, start: Callable[[], Awaitable[None]]
            ) -> ScaledPool:
                name = role.name.lower()
                return ScaledPool(role, least, most, lambda: len(live(name)), start, retire(name))

            most = self.spec.max_workers or self.spec.num_workers
            pools = [pool(WorkerRole.DECODE, 1, most, start_decode)]
            if self.spec.num_prefill_workers:
                most = self.spec.max_prefill_workers or self.spec.num_prefill_workers
                least = min(self.spec.min_prefill_workers, most)
                pools.append(pool(WorkerRole.PREFILL, least, most, start_prefill))
            await WorkerScaler(pools).follow(namespace, nats_url, security.nats)

    def _next_decode_name(self) -> str:
        self._num_decode_started += 1
        return f"decode-{self._num_decode_started - 1}"

    async def _hand_over(self, standby: StandbyWorker, decode_args: list[str]) -> Child | None:
        """Make a standby a decode worker: a child, which a restart starts cold. None if the
        standby is gone (it is then stopped, and no child)."""
        child = Child(standby.name, "decode", standby.proc, worker_command(decode_args))
        self._children.append(child)  # first: stop() must find it, whatever happens next
        try:
            await standby.hand_over()
        except OSError as exc:
            logger.warning("standby %s lost (%s); starting a worker cold", standby.name, exc)
            await standby.stop(self.spec.stop_timeout_s)
            self._children.remove(child)  # after: a stop() meanwhile stops it as a child
            return None
        self._started_at[child.name] = asyncio.get_running_loop().time()
        logger.info(
            "started %s pid=%d from a standby (warm: %s)",
            child.name,
            child.proc.pid,
            "yes" if standby.is_warm else "not yet",
        )
        return child

    async def _retire(self, child: Child) -> None:
        await stop_process(child.name, child.proc, self.spec.stop_timeout_s)
        self._children.remove(child)
        self.retired.append(child)
        logger.info("retired %s exit code=%s", child.name, child.proc.returncode)
