"""Standby workers: worker processes started ahead of need, so that a scale-up skips most of
a worker's start-up.

A standby runs ``python -m services.worker --standby <the worker's own arguments>``: it
imports the worker, warms what its engine and KV transport pay for on first use (torch,
NIXL's UCX), writes ``warm`` and waits, connected to nothing and registered nowhere. Its stdin
is one end of a socket pair whose other end the launcher holds. The handover is one line
back, a JSON list of arguments appended to its command line (``[]``: as started; a flag given
again wins). The process then starts as any worker does: it connects, registers and serves.
Closing the launcher's end first, or SIGTERM, ends a standby (docs/planner.md, "Worker
start").

:class:`StandbyPool` keeps a number of them for a cluster whose planner may ask for workers:
it starts them, replaces each one taken or dead, and stops the rest when it is cancelled.
"""

import asyncio
import json
import logging
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence

from services.launcher.processes import stop_process

logger = logging.getLogger(__name__)

# How the owner starts a child: (name, command line, stdin) -> the process; its environment
# and log file are the owner's business.
ExecChild = Callable[[str, tuple[str, ...], socket.socket], Awaitable[asyncio.subprocess.Process]]


def worker_command(worker_args: Sequence[str]) -> tuple[str, ...]:
    """The command line of a worker started cold."""
    return (sys.executable, "-m", "services.worker", *worker_args)


def standby_command(worker_args: Sequence[str]) -> tuple[str, ...]:
    """The command line of a standby that becomes ``worker_command(worker_args)``."""
    return (sys.executable, "-m", "services.worker", "--standby", *worker_args)


class StandbyWorker:
    """One standby process and the launcher's end of its socket. Start it with :meth:`start`;
    after :meth:`hand_over` the process is an ordinary worker that this object no longer
    speaks to."""

    def __init__(
        self,
        name: str,
        proc: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.name = name
        self.proc = proc
        self.is_warm = False
        self._reader = reader
        self._writer = writer
        self._started_s = asyncio.get_running_loop().time()

    @classmethod
    async def start(
        cls, name: str, worker_args: Sequence[str], exec_child: ExecChild
    ) -> "StandbyWorker":
        parent, child = socket.socketpair()
        try:
            reader, writer = await asyncio.open_unix_connection(sock=parent)
        except BaseException:
            parent.close()
            child.close()
            raise
        try:
            proc = await exec_child(name, standby_command(worker_args), child)
        except BaseException:
            writer.close()
            raise
        finally:
            child.close()  # the process has its copy
        logger.info("started standby %s pid=%d", name, proc.pid)
        return cls(name, proc, reader, writer)

    async def wait_warm(self) -> bool:
        """True once it has done its imports and warm-up; False if it ended first. One caller
        at a time; the caller sets the deadline."""
        if not self.is_warm:
            line = await self._reader.readline()
            if line == b"warm\n":
                self.is_warm = True
                took_s = asyncio.get_running_loop().time() - self._started_s
                logger.info("standby %s warm in %.2f s", self.name, took_s)
        return self.is_warm

    async def hand_over(self, extra_args: Sequence[str] = ()) -> None:
        """Send it its assignment: it starts serving with ``extra_args`` appended to its
        command line. Raises ``ConnectionError`` (or another ``OSError``) if it is gone."""
        try:
            self._writer.write(json.dumps(list(extra_args)).encode() + b"\n")
            await self._writer.drain()
        finally:
            self._writer.close()

    async def stop(self, timeout_s: float) -> None:
        """End a standby not handed over: close its socket, SIGTERM it, and kill it if it
        outlives ``timeout_s``. Safe to call twice."""
        self._writer.close()
        await stop_process(f"standby {self.name}", self.proc, timeout_s)


class StandbyPool:
    """Keeps ``size`` standbys of one worker command line. :meth:`run` starts them and replaces
    each one taken or dead (after a backoff that doubles while they die before they are warm)
    until cancelled, then stops those left; :meth:`take` gives one away, a warm one first."""

    def __init__(
        self,
        *,
        size: int,
        worker_args: Sequence[str],
        exec_child: ExecChild,
        next_name: Callable[[], str],
        backoff_s: float = 0.5,
        backoff_max_s: float = 10.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.standbys: list[StandbyWorker] = []
        self.num_taken = 0
        self._worker_args = tuple(worker_args)
        self._exec_child = exec_child
        self._next_name = next_name
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s
        self._stop_timeout_s = stop_timeout_s
        self._delay_s = 0.0  # before the next start: 0 unless standbys have been dying
        self._spare_names: list[str] = []  # of standbys that died: their replacements reuse them
        self._watches: dict[StandbyWorker, asyncio.Task[None]] = {}
        self._changed = asyncio.Event()

    def take(self) -> StandbyWorker | None:
        """A live standby, now the caller's to hand over (or stop); None if there is none."""
        live = [s for s in self.standbys if s.proc.returncode is None]
        if not live:
            return None
        standby = max(live, key=lambda s: s.is_warm)  # the first warm one, else the oldest
        self.standbys.remove(standby)
        watch = self._watches.pop(standby, None)
        if watch is not None:
            watch.cancel()
        self.num_taken += 1
        self._changed.set()
        return standby

    async def run(self) -> None:
        """Keep ``size`` standbys until cancelled; stop the ones left on the way out."""
        try:
            async with asyncio.TaskGroup() as tg:
                while True:
                    while len(self.standbys) < self.size:
                        if self._delay_s:
                            await asyncio.sleep(self._delay_s)
                        name = self._spare_names.pop() if self._spare_names else self._next_name()
                        try:
                            standby = await StandbyWorker.start(
                                name, self._worker_args, self._exec_child
                            )
                        except OSError as exc:
                            self._note_death(name, f"did not start ({exc})")
                            continue
                        self.standbys.append(standby)
                        self._watches[standby] = tg.create_task(
                            self._watch(standby), name=f"standby {name}"
                        )
                    await self._changed.wait()
                    self._changed.clear()
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Stop every standby not taken. Safe to call twice."""
        standbys, self.standbys = self.standbys, []
        for watch in self._watches.values():
            watch.cancel()
        self._watches.clear()
        await asyncio.gather(*(s.stop(self._stop_timeout_s) for s in standbys))

    async def _watch(self, standby: StandbyWorker) -> None:
        """Note when it is warm; if it ends before it is taken, make room for a replacement."""
        if await standby.wait_warm():
            self._delay_s = 0.0
        code = await standby.proc.wait()
        if standby in self.standbys:
            self.standbys.remove(standby)
            self._watches.pop(standby, None)
            await standby.stop(self._stop_timeout_s)  # it has exited: this closes its socket
            self._note_death(standby.name, f"exited with code {code}")
            self._changed.set()

    def _note_death(self, name: str, reason: str) -> None:
        """A standby ended (or never started): its replacement takes its name after a delay."""
        self._spare_names.append(name)
        self._delay_s = min(max(self._delay_s * 2, self._backoff_s), self._backoff_max_s)
        logger.warning("standby %s %s; replacing it in %.1f s", name, reason, self._delay_s)
