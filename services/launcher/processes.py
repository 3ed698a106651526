"""A cluster's child processes: the record of one, waiting for one to exit, stopping one."""

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass
class Child:
    """One service process: ``name`` is e.g. ``decode-1``; ``role`` is router, prefill, decode
    or frontend; ``command`` its command line. A restart replaces ``proc`` and keeps the rest."""

    name: str
    role: str
    proc: asyncio.subprocess.Process
    command: tuple[str, ...] = ()
    is_retiring: bool = False  # stopped at the planner's request: not to be restarted


async def stop_process(name: str, proc: asyncio.subprocess.Process, timeout_s: float) -> None:
    """SIGTERM ``proc`` (unless it has exited) and wait; kill it if it outlives ``timeout_s``."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(timeout_s):
            await proc.wait()
    except TimeoutError:
        logger.warning("%s did not stop in %.0f s; killing", name, timeout_s)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def wait_popen(proc: "subprocess.Popen[bytes]") -> int:
    """Wait for a ``subprocess.Popen`` child; its exit code. On a pidfd where the OS has them
    (Linux): nothing else may reap the child meanwhile. Elsewhere in a thread, which outlives
    a cancelled wait until the process exits (stop() stops it next)."""
    if proc.poll() is None:
        try:
            await _wait_pidfd(proc.pid)
        except (AttributeError, OSError):  # no pidfds here
            return await asyncio.to_thread(proc.wait)
    return proc.wait()  # it has exited: this reaps it at once


async def _wait_pidfd(pid: int) -> None:
    """Return once the (unreaped) child ``pid`` has exited."""
    pidfd = os.pidfd_open(pid)
    try:
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def on_readable() -> None:  # once the process has exited, also if it already had
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, on_readable)
        try:
            await exited
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)
