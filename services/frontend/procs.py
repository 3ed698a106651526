"""Several frontend processes serving one port (``baton-frontend --procs N``).

One process's event loop is the ceiling for connections and CPU: N processes, each with its
own NATS connection, stream inbox and worker view, listen on the same port with SO_REUSEPORT
and the kernel spreads new connections over them. This parent serves nothing itself: it
starts the N children with the same settings, restarts one that exits unexpectedly (with
backoff), and on SIGTERM/SIGINT passes the signal on and waits for them to drain. Each child
dies with the parent (PR_SET_PDEATHSIG), so a killed parent leaves no listener behind.

Their ``/metrics`` are one view: each child writes a snapshot of its series to a directory
they share, and any of them answers with the sum (``metrics_merge``).
"""

import asyncio
import ctypes
import logging
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence

from services.frontend.config import FrontendConfig
from services.frontend.metrics_merge import snapshot_path
from shared.lifecycle import default_num_procs, fd_hard_limit, shutdown_event
from shared.servers import check_port_free, free_port

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_BACKOFF_S = 0.5
_BACKOFF_MAX_S = 10.0
_RESET_AFTER_S = 30.0


def _die_with_parent() -> None:
    """In the child between fork and exec: SIGTERM when the parent dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the parent's own shutdown still stops it
        pass


async def serve_procs(config: FrontendConfig, argv: Sequence[str]) -> int:
    """Run ``config.procs`` frontend processes (0: as many as this machine's cores and
    open-file limit call for, ``default_num_procs``; with a TTFT objective, its cores)
    until SIGTERM/SIGINT; the exit code."""
    num_procs = config.procs or default_num_procs(sheds=config.slo.ttft_s is not None)
    port = config.port or free_port()
    try:
        check_port_free(config.host, port)
    except OSError as exc:
        raise SystemExit(f"baton-frontend: cannot listen on {config.host}:{port}: {exc}") from None
    metrics_dir = tempfile.mkdtemp(prefix="baton-frontend-metrics-")
    base = [sys.executable, "-m", "services.frontend", *argv]
    commands = []
    for i in range(num_procs):
        command = [*base, "--procs", "1", "--reuse-port", "true", "--port", str(port)]
        command += ["--nice", "0"]  # inherited from this process already
        command += ["--metrics-dir", metrics_dir]
        if config.frontend_id:
            command += ["--frontend-id", f"{config.frontend_id}-{i}"]
        commands.append(command)
    stopping = shutdown_event()
    logger.info(
        "frontend processes=%d open_files_per_process=%d url=http://%s:%d",
        num_procs,
        fd_hard_limit(),
        config.host,
        port,
    )
    try:
        async with asyncio.TaskGroup() as tg:
            children = [
                tg.create_task(
                    _run_child(i, command, metrics_dir, stopping, config.drain_timeout_s)
                )
                for i, command in enumerate(commands)
            ]
        codes = [task.result() for task in children]
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return max(codes, default=0)


async def _run_child(
    index: int, command: list[str], metrics_dir: str, stopping: asyncio.Event, drain_s: float
) -> int:
    """Keep child ``index`` running until ``stopping``; then stop it. Its last exit code."""
    backoff_s = _BACKOFF_S
    while True:
        started_s = time.monotonic()
        proc = await asyncio.create_subprocess_exec(*command, preexec_fn=_die_with_parent)
        logger.info("frontend process %d started pid=%d", index, proc.pid)
        waiting = asyncio.ensure_future(proc.wait())
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait([waiting, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if stopping.is_set():
            return await _stop_child(proc, waiting, drain_s)
        code = waiting.result()
        # Its gauges (requests in flight) must not outlive it in the sum.
        snapshot_path(metrics_dir, proc.pid).unlink(missing_ok=True)
        if time.monotonic() - started_s > _RESET_AFTER_S:
            backoff_s = _BACKOFF_S
        logger.error(
            "frontend process %d exited code=%s; restarting in %.1f s", index, code, backoff_s
        )
        try:
            async with asyncio.timeout(backoff_s):
                await stopping.wait()
            return code
        except TimeoutError:
            pass
        backoff_s = min(backoff_s * 2, _BACKOFF_MAX_S)


async def _stop_child(
    proc: asyncio.subprocess.Process, waiting: "asyncio.Future[int]", drain_s: float
) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(drain_s + 10.0):
            return await waiting
    except TimeoutError:
        logger.error("frontend process pid=%d outlived its drain; killing it", proc.pid)
        proc.kill()
        return await waiting
