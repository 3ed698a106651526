"""Client processes: spread the shares over processes, start them together, merge results.

With one process the share runs on this loop. With more, each spawned process gets every
N-th request of the same schedule and its own slots of a shared counter array; the parent
waits until all are ready, then sets a common start time (CLOCK_MONOTONIC is system-wide)
and draws the progress line while they run. On SIGINT or SIGTERM the parent closes a pipe
the children watch, and each stops sending and reports what it has.
"""

import asyncio
import logging
import math
import multiprocessing
import queue
import resource
import signal
import time
import traceback
from collections.abc import Coroutine, MutableSequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

from services.bench.arrivals import Stage
from services.bench.client import Share, ShareResult, cpu_seconds, run_share
from services.bench.metrics import merge_cpu_seconds
from services.bench.outcome import Outcome
from services.bench.progress import NUM_TALLIES, progress_line
from shared.lifecycle import shutdown_event

logger = logging.getLogger(__name__)

T = TypeVar("T")
START_DELAY_S = 0.3  # between the start signal and the first due time
READY_TIMEOUT_S = 60.0


@dataclass(slots=True)
class RunResult:
    outcomes: list[Outcome]
    cpu_s_by_second: list[float]  # client processes, per second of the run
    client_cpu_s: float  # every client process and the parent, whole run
    wall_s: float  # from the schedule's start until the last response
    started_at: float  # wall clock (epoch seconds) of the schedule's start
    stopped_s: float | None = None  # seconds into the schedule when it was stopped early


def raise_open_files_limit() -> None:
    """Thousands of open streams need as many sockets as the hard limit allows."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


@dataclass(frozen=True, slots=True)
class _Link:
    """A child's ties to the parent (shared memory, events and pipes; passed at spawn)."""

    counters: Any  # RawArray of NUM_TALLIES per process
    go: Any  # Event: the start time is set
    start_at: Any  # RawValue: monotonic time of the schedule's start
    messages: Any  # Queue to the parent: ready, done or failed
    stop: Any  # Connection: readable (EOF) once the parent closes its end: stop


async def _child(index: int, share: Share, link: _Link) -> ShareResult:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_stop() -> None:  # level-triggered: stop watching, or it fires every iteration
        loop.remove_reader(link.stop.fileno())
        stopping.set()

    loop.add_reader(link.stop.fileno(), on_stop)
    link.messages.put(("ready", index))
    if not await asyncio.to_thread(link.go.wait, READY_TIMEOUT_S):
        raise TimeoutError(f"no start signal in {READY_TIMEOUT_S} s")
    base = index * NUM_TALLIES
    return await run_share(share, link.start_at.value, link.counters, base, stopping)


def child_main(index: int, share: Share, link: _Link) -> None:
    """Entry point of client process ``index``: run its share, send back its result. It
    ignores SIGINT (Ctrl-C reaches the whole group): it stops when the parent says so, or
    dies, closing the stop pipe, so its result always gets back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        raise_open_files_limit()
        result = _run(_child(index, share, link))
        link.messages.put(("done", index, result, cpu_seconds()))
    except BaseException:
        link.messages.put(("failed", index, traceback.format_exc()))
        raise


async def _run_here(share: Share, stages: list[Stage], show: bool) -> RunResult:
    stopping = shutdown_event()
    counters: MutableSequence[int] = [0] * NUM_TALLIES
    cpu_before = cpu_seconds()
    t0 = time.monotonic() + START_DELAY_S
    started_at = time.time() + START_DELAY_S
    async with progress_line(show, t0, stages, counters, 1):
        result = await run_share(share, t0, counters, 0, stopping)
    return RunResult(
        outcomes=result.outcomes,
        cpu_s_by_second=result.cpu_s_by_second,
        client_cpu_s=cpu_seconds() - cpu_before,
        wall_s=time.monotonic() - t0,
        started_at=started_at,
        stopped_s=result.stopped_s,
    )


def _next_message(messages: Any, procs: list[BaseProcess], timeout_s: float) -> tuple[Any, ...]:
    """The next message from a child; raises if one died without a word or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            message: tuple[Any, ...] = messages.get(timeout=1.0)
            return message
        except queue.Empty:
            dead = [p.name for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"client processes {dead} died") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"no word from client processes in {timeout_s} s") from None


async def _gather(
    messages: Any, procs: list[BaseProcess], kind: str, timeout_s: float
) -> list[Any]:
    """One ``kind`` message from every child, in process order."""
    got: dict[int, tuple[Any, ...]] = {}
    while len(got) < len(procs):
        message = await asyncio.to_thread(_next_message, messages, procs, timeout_s)
        if message[0] == "failed":
            raise RuntimeError(f"client process {message[1]} failed:\n{message[2]}")
        if message[0] == kind:
            got[message[1]] = message
    return [got[i] for i in range(len(procs))]


async def _run_spread(shares: list[Share], stages: list[Stage], show: bool) -> RunResult:
    ctx = multiprocessing.get_context("spawn")
    stop_reader, stop_writer = ctx.Pipe(duplex=False)
    link = _Link(
        counters=ctx.RawArray("q", NUM_TALLIES * len(shares)),
        go=ctx.Event(),
        start_at=ctx.RawValue("d", 0.0),
        messages=ctx.Queue(),
        stop=stop_reader,
    )
    procs: list[BaseProcess] = [
        ctx.Process(
            target=child_main,
            args=(i, share, link),
            name=f"baton-bench-client-{i}",
            daemon=True,
        )
        for i, share in enumerate(shares)
    ]
    stopping = shutdown_event()
    cpu_before = cpu_seconds()

    for proc in procs:
        proc.start()
    stop_reader.close()  # the children hold it now
    try:
        await _gather(link.messages, procs, "ready", READY_TIMEOUT_S)
        t0 = link.start_at.value = time.monotonic() + START_DELAY_S
        started_at = time.time() + START_DELAY_S
        link.go.set()
        async with progress_line(show, t0, stages, link.counters, len(shares)):
            wait_done = asyncio.create_task(_gather(link.messages, procs, "done", math.inf))
            stop = asyncio.create_task(stopping.wait())
            await asyncio.wait({wait_done, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            stop_writer.close()  # every child sees EOF: stop sending, report
            done = await wait_done
        wall_s = time.monotonic() - t0
    finally:
        stop_writer.close()
        for proc in procs:
            proc.join(5)
            if proc.exitcode is None:
                proc.kill()
    results: list[ShareResult] = [m[2] for m in done]
    return RunResult(
        outcomes=sorted((o for r in results for o in r.outcomes), key=lambda o: o.index),
        cpu_s_by_second=merge_cpu_seconds(r.cpu_s_by_second for r in results),
        client_cpu_s=sum(m[3] for m in done) + cpu_seconds() - cpu_before,
        wall_s=wall_s,
        started_at=started_at,
        stopped_s=min((r.stopped_s for r in results if r.stopped_s is not None), default=None),
    )


async def run_clients(shares: list[Share], stages: list[Stage], *, show: bool) -> RunResult:
    """Run every share (one per client process) on one schedule and merge the outcomes."""
    raise_open_files_limit()
    if len(shares) == 1:
        return await _run_here(shares[0], stages, show)
    return await _run_spread(shares, stages, show)
