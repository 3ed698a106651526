"""Process lifecycle: signals to a shutdown event, and logging set-up for ``main()``."""

import asyncio
import logging
import math
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any


def shutdown_event() -> asyncio.Event:
    """An event set by the first SIGTERM or SIGINT; a second SIGINT exits at once (as uvicorn
    does), for an operator who does not want to wait for the drain."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stopping.is_set() and signum == signal.SIGINT:
            os._exit(130)
        logging.getLogger(__name__).info(
            "shutdown requested signal=%s", signal.Signals(signum).name
        )
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    return stopping


def raise_fd_limit() -> int:
    """Lift this process's soft limit on open files to the hard one (each open connection
    holds one); the limit now."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return hard


def fd_hard_limit() -> int:
    """The open files each process may reach (``raise_fd_limit`` lifts it there); 0 when
    unknown or unlimited."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 0
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 0 if hard == resource.RLIM_INFINITY else hard


# The client connections a frontend started with defaults is sized to hold at once: the scale
# it is built and measured for (docs/performance.md).
DEFAULT_NUM_CONNECTIONS = 50_000
# The share of a process's open-file limit counted on for client connections. The rest is
# headroom: the kernel spreads connections over the processes only about evenly, keep-alive
# connections between requests hold a file too, and so do the process's own NATS and etcd
# connections, logs and tokenizer files.
CONNECTION_SHARE_OF_FD_LIMIT = 0.75
MAX_DEFAULT_PROCS = 8


def num_procs_for(
    num_cpus: int, fd_limit: int, num_connections: int = DEFAULT_NUM_CONNECTIONS
) -> int:
    """How many processes a service that scales by processes (the frontend) runs by default,
    the larger of two needs, each at most ``MAX_DEFAULT_PROCS``:

    - cores: one per core, at least 2 (a second keeps serving while one is busy or
      restarting);
    - files: enough that ``num_connections`` client connections fit in
      ``CONNECTION_SHARE_OF_FD_LIMIT`` of each process's open-file limit (every connection
      holds one file). With 20,000 files per process, 50,000 connections need 4 processes
      even on 2 cores; where the limit is 1,048,576 (common) this adds nothing.

    ``fd_limit`` 0 means unknown or unlimited: cores alone decide. Beyond the cap (a low
    limit such as 1,024), raise the hard limit or pass the count (``--procs``)."""
    by_cores = max(2, min(MAX_DEFAULT_PROCS, num_cpus))
    if fd_limit <= 0:
        return by_cores
    per_proc = max(1, int(fd_limit * CONNECTION_SHARE_OF_FD_LIMIT))
    by_files = min(MAX_DEFAULT_PROCS, math.ceil(num_connections / per_proc))
    return max(by_cores, by_files)


def default_num_procs(*, sheds: bool = False) -> int:
    """``num_procs_for`` this machine: its cores and its per-process open-file limit.

    ``sheds``: the service answers what it cannot serve in time (a TTFT objective is set),
    so it does not hold a burst of tens of thousands of queued streams, and cores alone
    decide. There a process beyond the cores costs what the sheds need: on 2 cores at ten
    times two engines' capacity, four frontend processes fell behind by seconds and goodput
    collapsed, where two held it (docs/admission.md, "Fewer frontend processes")."""
    fd_limit = 0 if sheds else fd_hard_limit()
    return num_procs_for(os.cpu_count() or 1, fd_limit)


def setup_logging(level: str) -> None:
    """Configure the root logger once, in ``main()``; never at import."""
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run_async(main: Coroutine[Any, Any, None]) -> None:
    """Run a service's ``serve()`` on uvloop where it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)
