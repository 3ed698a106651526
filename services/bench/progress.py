"""The live progress line: counters each client process bumps, summed and drawn on stderr.

Client processes write their own slots of one shared array (no locks: each slot has one
writer); the parent reads the sums twice a second. On a terminal the line redraws in place;
elsewhere (a CI log) one line is written every ``LOG_INTERVAL_S``.
"""

import asyncio
import contextlib
import enum
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import TextIO

from services.bench.arrivals import Stage, stage_at

REFRESH_S = 0.5
LOG_INTERVAL_S = 10.0


class Tally(enum.IntEnum):
    """Offsets of one process's counters in the shared array."""

    SENT = 0
    DONE = 1
    GOOD = 2
    SHED = 3
    ERRORS = 4
    IN_FLIGHT = 5


NUM_TALLIES = len(Tally)


def totals(counters: Sequence[int], num_procs: int) -> list[int]:
    """Each tally summed over the processes."""
    return [sum(counters[p * NUM_TALLIES + t] for p in range(num_procs)) for t in Tally]


def format_progress(elapsed_s: float, stage: str, sums: Sequence[int]) -> str:
    return (
        f"{elapsed_s:7.1f}s  {stage:<16} offered {sums[Tally.SENT]:>7}  "
        f"done {sums[Tally.DONE]:>7}  good {sums[Tally.GOOD]:>7}  "
        f"shed {sums[Tally.SHED]:>6}  errors {sums[Tally.ERRORS]:>5}  "
        f"in flight {sums[Tally.IN_FLIGHT]:>5}"
    )


def _stage_text(stages: list[Stage], elapsed_s: float) -> str:
    if not stages:
        return ""
    if elapsed_s >= stages[-1].end_s:
        return "draining"
    index = stage_at(stages, elapsed_s)
    return f"{index + 1}/{len(stages)} {stages[index].label}"


async def show_progress(
    stream: TextIO, t0: float, stages: list[Stage], counters: Sequence[int], num_procs: int
) -> None:
    """Draw the line until cancelled; the last state stays on screen."""
    is_tty = stream.isatty()
    last_logged = -LOG_INTERVAL_S

    def draw(final: bool) -> None:
        elapsed_s = max(0.0, time.monotonic() - t0)
        line = format_progress(
            elapsed_s, _stage_text(stages, elapsed_s), totals(counters, num_procs)
        )
        if is_tty:
            stream.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
        else:
            stream.write(line + "\n")
        stream.flush()

    try:
        while True:
            await asyncio.sleep(REFRESH_S)
            now = time.monotonic()
            if is_tty or now - last_logged >= LOG_INTERVAL_S:
                draw(final=False)
                last_logged = now
    finally:
        draw(final=True)


@contextlib.asynccontextmanager
async def progress_line(
    is_shown: bool, t0: float, stages: list[Stage], counters: Sequence[int], num_procs: int
) -> AsyncIterator[None]:
    """Show the progress line on stderr (if ``is_shown``) while the block runs."""
    if not is_shown:
        yield
        return
    task = asyncio.create_task(show_progress(sys.stderr, t0, stages, counters, num_procs))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait({task})
