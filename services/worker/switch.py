"""Role switching: a running worker becomes a prefill or a decode worker in place, on a
``RoleSwitch`` in its inbox, keeping its process, its engine loop, its KV cache and its
transfer agent. The planner asks for it (docs/planner.md); anyone may, by request-reply.

Step by step (``RoleSwitcher``):

1. **Check** the command, answering a refusal with a typed ``ErrorReply``: addressed to this
   worker, a role it can take (prefill needs a KV transfer agent), not draining, registered,
   no other switch under way, and not the last decode worker (its streams and the new
   requests would have nowhere to go). Asked for the role it has, it answers at once.
2. **Stop taking the old role's work**: from here the shell refuses it with ``Unavailable``,
   so that a frontend tries its next worker and a decode worker prefills locally.
3. **Hand off** (decode to prefill): at the next step boundary every running stream moves to
   a decode peer with its KV (``DecodeRole.move_out``, the drain's live migration). From
   prefill to decode nothing moves: prompts being computed are short and finish.
4. **New role** around the same engine loop. The old one retires beside it
   (``RoleSet.retire``): it still gets its requests' outputs, aborts and KV releases until
   it owes nothing (held prompt KV read or timed out; lent stream KV read), for at most
   ``settle_timeout_s``.
5. **Re-register** under the same worker id with the new role. Routers and frontends follow
   the etcd entry and send it that role's requests from then on.

The switch time, from the command's arrival to step 5's put, is logged and exported.
"""

import asyncio
import logging
import time
from collections.abc import Callable

from proto.messages import ErrorReply, RoleSwitch, RoleSwitched, WorkerRole
from services.worker.role import Role
from services.worker.shell import WorkerShell
from shared.codec import encode
from shared.errors import EngineError, InvalidRequest, ServingError, Unavailable

logger = logging.getLogger(__name__)

SWITCH_ROLES = (WorkerRole.PREFILL, WorkerRole.DECODE)


class RoleSwitcher:
    """Answers ``RoleSwitch`` for one worker's shell; one switch at a time."""

    def __init__(
        self,
        shell: WorkerShell,
        make_role: Callable[[WorkerRole], Role],
        *,
        can_prefill: bool,
        has_decode_peer: Callable[[], bool],
        settle_timeout_s: float,
    ) -> None:
        self._shell = shell
        self._make_role = make_role
        self._can_prefill = can_prefill
        self._has_decode_peer = has_decode_peer
        self._settle_timeout_s = settle_timeout_s
        self.target: WorkerRole | None = None  # set while a switch is under way
        self.num_switches = 0
        self.num_refused = 0
        self.last_switch_s: float | None = None
        self._task: asyncio.Task[None] | None = None

    async def on_command(self, command: RoleSwitch, reply_subject: str, received_s: float) -> None:
        """Refuse, or answer at once (the role it has), or start the switch, which answers
        when it is done. Returns at once either way: the inbox goes on."""
        shell = self._shell
        current = shell.role.kind
        try:
            if not self._check(command):
                await self._answer(reply_subject, self._switched(command, current, 0.0, 0))
                return
        except ServingError as exc:
            self.num_refused += 1
            logger.info(
                "role switch refused worker_id=%s to=%s seq=%d error=%s",
                shell.context.worker_id,
                command.role.name.lower(),
                command.seq,
                exc,
            )
            await self._answer(reply_subject, exc.to_reply())
            return
        self.target = command.role  # before any await: the next message already sees it
        self._task = asyncio.create_task(
            self._switch(command, reply_subject, received_s), name="role-switch"
        )

    def _check(self, command: RoleSwitch) -> bool:
        """Whether the switch is to be made (False: the worker has the role already); a
        ``ServingError`` saying why not."""
        shell = self._shell
        worker_id = shell.context.worker_id
        if command.worker_id != worker_id:
            raise InvalidRequest(f"a RoleSwitch for {command.worker_id} was sent to {worker_id}")
        if command.role not in SWITCH_ROLES:
            raise InvalidRequest(
                f"a worker switches between prefill and decode; asked for {command.role.name}"
            )
        if shell.is_draining:
            raise Unavailable(f"worker {worker_id} is draining")
        if not shell.is_registered:
            raise Unavailable(f"worker {worker_id} is not registered yet", retry_after_s=1.0)
        if self.target is not None:
            raise Unavailable(
                f"worker {worker_id} is switching to {self.target.name.lower()} already",
                retry_after_s=1.0,
            )
        current = shell.role.kind
        if command.role is current:
            return False
        if command.role is WorkerRole.PREFILL and not self._can_prefill:
            raise InvalidRequest(
                f"worker {worker_id} cannot prefill for others: it has no KV transfer agent"
            )
        if current is WorkerRole.DECODE and not self._has_decode_peer():
            raise Unavailable(
                f"worker {worker_id} is the last decode worker: its streams and new requests "
                "would have nowhere to go",
                retry_after_s=5.0,
            )
        return True

    async def _switch(self, command: RoleSwitch, reply_subject: str, received_s: float) -> None:
        shell = self._shell
        worker_id = shell.context.worker_id
        previous = shell.role.kind
        names = (previous.name.lower(), command.role.name.lower())
        logger.info(
            "role switch started worker_id=%s from=%s to=%s seq=%d planner_id=%s reason=%s",
            worker_id,
            *names,
            command.seq,
            command.planner_id,
            command.reason,
        )
        reply: RoleSwitched | ErrorReply
        try:
            num_moved = await shell.role.move_out()
            shell.roles.retire(self._make_role(command.role), self._settle_timeout_s)
            try:
                await shell.reregister(command.role)
            except Unavailable as exc:
                raise Unavailable(
                    f"worker {worker_id} serves as {names[1]} now, but etcd did not take its "
                    f"new entry (it is put again with the lease): {exc}",
                    retry_after_s=1.0,
                ) from exc
            switch_s = time.monotonic() - received_s
            self.num_switches += 1
            self.last_switch_s = switch_s
            logger.info(
                "role switched worker_id=%s from=%s to=%s switch_s=%.3f num_moved=%d seq=%d",
                worker_id,
                *names,
                switch_s,
                num_moved,
                command.seq,
            )
            reply = self._switched(command, previous, switch_s, num_moved)
        except ServingError as exc:
            logger.warning(
                "role switch failed worker_id=%s from=%s to=%s error=%s", worker_id, *names, exc
            )
            reply = exc.to_reply()
        except Exception as exc:  # a bug: say so to the asker, keep serving in whichever role
            logger.exception("role switch broke worker_id=%s from=%s to=%s", worker_id, *names)
            reply = EngineError(f"role switch broke: {exc!r}").to_reply()
        finally:
            self.target = None
        await self._answer(reply_subject, reply)

    def _switched(
        self, command: RoleSwitch, previous: WorkerRole, switch_s: float, num_moved: int
    ) -> RoleSwitched:
        return RoleSwitched(
            worker_id=self._shell.context.worker_id,
            role=command.role,
            previous_role=previous,
            switch_s=switch_s,
            num_moved=num_moved,
            seq=command.seq,
        )

    async def _answer(self, reply_subject: str, reply: RoleSwitched | ErrorReply) -> None:
        if not reply_subject:
            return
        try:
            await self._shell.bus.publish_bytes(reply_subject, encode(reply))
        except ServingError as exc:
            self._shell.log.log("switch reply", "role switch reply not sent error=%s", exc)

    async def close(self) -> None:
        """Wait for a switch under way (each of its steps is bounded). Safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait([task])
