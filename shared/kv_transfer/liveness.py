"""Watching a same-machine owner process: a pidfd that turns readable when the owner exits.

One-sided transports (shm, cuda_ipc) read the owner's memory without its help, so nothing tells
them it died; they poll its pidfd before and after each copy instead. The owner's start time is
checked once the pidfd pins the pid, so a reused pid is not taken for the owner.
"""

import logging
import os
import select

from shared.kv_transfer.base import RemoteUnavailable
from shared.kv_transfer.metadata import pid_namespace, process_start_time

logger = logging.getLogger(__name__)


def open_owner_pidfd(name: str, pid: int, namespace: str, start_time: int) -> int | None:
    """A pidfd for the owner, or None when its pid means nothing here (another pid namespace)
    or pidfds are forbidden. Raises ``RemoteUnavailable`` when the owner has already exited."""
    if namespace != pid_namespace():
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError as exc:
        raise RemoteUnavailable(f"{name!r} (pid {pid}) has exited", remote_name=name) from exc
    except OSError as exc:  # seccomp may forbid pidfd_open
        logger.warning("kv cannot watch owner pid=%d error=%r", pid, exc)
        return None
    try:
        actual = process_start_time(pid)  # checked after pinning the pid
    except OSError:
        actual = -1
    if actual != start_time:
        os.close(pidfd)
        raise RemoteUnavailable(
            f"{name!r} (pid {pid}) has exited; the pid was reused", remote_name=name
        )
    return pidfd


class OwnerWatch:
    """``check`` raises ``RemoteUnavailable`` once the owner has exited; a watch without a pidfd
    (another pid namespace) never does. ``close`` is idempotent."""

    def __init__(self, name: str, pid: int, namespace: str, start_time: int) -> None:
        self.name = name
        self.pid = pid
        self._pidfd = open_owner_pidfd(name, pid, namespace, start_time)
        # Quoted: select.poll is a function at run time, a class only to type checkers.
        self._poll: select.poll | None = None
        if self._pidfd is not None:
            self._poll = select.poll()
            self._poll.register(self._pidfd, select.POLLIN)

    def check(self) -> None:
        if self._poll is not None and self._poll.poll(0):
            raise RemoteUnavailable(
                f"{self.name!r} (pid {self.pid}) has exited", remote_name=self.name
            )

    def close(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
            self._poll = None
