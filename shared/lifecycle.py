"""Process lifecycle: signals to a shutdown event, and logging set-up for ``main()``."""

import asyncio
import logging
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


def default_num_procs() -> int:
    """How many processes a service that scales by processes (the frontend) runs by default:
    one per core, at least 2 (a second keeps serving while one is busy or restarting, and
    doubles the file descriptors, often 20,000 per process) and at most 8."""
    return max(2, min(8, os.cpu_count() or 1))


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
