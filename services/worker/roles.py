"""The roles a worker has over time: the one it serves as, and the retiring ones (left by a
role switch) that still owe something, each with the tasks that run and settle it."""

import asyncio
import logging
from collections import Counter
from collections.abc import Iterator

from services.worker.role import Role

logger = logging.getLogger(__name__)


class RoleSet:
    """``current`` takes new work; a *retiring* role takes none but still gets its requests'
    outputs, aborts and KV releases (the shell hands every one to each role in the set, and
    a role ignores ids it does not hold) until it has settled (``Role.settle``). Its tasks
    live in the worker's task group, given to ``start``."""

    def __init__(self, role: Role) -> None:
        self.current = role
        self.retiring: list[Role] = []
        self.past_counts: Counter[str] = Counter()  # counters of the roles closed so far
        self._tg: asyncio.TaskGroup | None = None
        self._run_tasks: dict[Role, asyncio.Task[None]] = {}  # each role's run()
        self._settling: dict[Role, asyncio.Task[None]] = {}  # each retiring role's settle
        self._is_closed = False

    def __iter__(self) -> Iterator[Role]:
        """The current role, then the retiring ones (a snapshot: safe across awaits)."""
        return iter([self.current, *self.retiring])

    def holds_output(self) -> bool:
        """Whether every role holds the step's outputs (``Role.holds_output``)."""
        return all(role.holds_output() for role in self)

    @property
    def num_in_flight(self) -> int:
        return sum(len(role.in_flight) for role in self)

    @property
    def num_handoffs(self) -> int:
        return sum(role.num_handoffs for role in self)

    def count(self, name: str) -> float:
        """A role counter (``Role.counters``) over the worker's life: every role it had."""
        return self.past_counts[name] + sum(role.counters().get(name, 0) for role in self)

    def start(self, tg: asyncio.TaskGroup) -> None:
        """Run the current role's background work in ``tg`` (the worker's)."""
        self._tg = tg
        self._run(self.current)

    def retire(self, new: Role, settle_timeout_s: float) -> Role:
        """Make ``new`` the current role; the old one retires: it settles beside the new one
        (for up to ``settle_timeout_s``) and is then closed, its counters kept. Returns it."""
        assert self._tg is not None  # start() ran
        old, self.current = self.current, new
        self.retiring.append(old)
        self._run(new)
        task = self._tg.create_task(
            self._settle(old, settle_timeout_s), name=f"settle-{old.kind.name.lower()}"
        )
        self._settling[old] = task
        return old

    async def wait_settled(self) -> None:
        """Until every retiring role has settled (each is bounded by its settle timeout)."""
        if self._settling:
            await asyncio.wait(list(self._settling.values()))

    async def close(self) -> None:
        """At shutdown: stop the retiring roles' settling (each closes its role), then close
        the current role. Safe to call twice."""
        if self._is_closed:
            return
        self._is_closed = True
        settling = list(self._settling.values())
        for task in settling:
            task.cancel()
        if settling:
            await asyncio.wait(settling)
        await self._close(self.current)

    def _run(self, role: Role) -> None:
        assert self._tg is not None
        self._run_tasks[role] = self._tg.create_task(
            role.run(), name=f"role-{role.kind.name.lower()}"
        )

    async def _settle(self, role: Role, timeout_s: float) -> None:
        try:
            await role.settle(timeout_s)
            logger.info("retired role settled role=%s", role.kind.name.lower())
        finally:
            # Its counts move to ``past_counts`` as it leaves ``retiring``, with no await
            # between: /metrics never sees a counter drop (or count one twice).
            self.past_counts.update(role.counters())
            self.retiring.remove(role)
            self._settling.pop(role, None)
            await self._close(role)

    async def _close(self, role: Role) -> None:
        task = self._run_tasks.pop(role, None)
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        await role.close()
