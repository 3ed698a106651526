"""A standby worker's wait: a process started ahead of need pays for its imports and one-time
set-up, then waits, unregistered and connected to nothing, for the rest of its command line.

``python -m services.worker --standby ARGS`` imports the worker (``__main__`` does, before
this runs), warms what the engine and KV transport of ``ARGS`` would pay for at start-up
(importing torch and the model code; NIXL's UCX, whose first agent takes ~0.4 s to set up),
writes ``warm\\n`` to fd 0 and reads one line from it: a JSON list of arguments appended to
``ARGS`` (a flag given again wins). End of file instead: it was not needed; exit 0. fd 0 is a
socket whose other end the launcher holds (``services/launcher/standby.py``); from a terminal,
type the line.
"""

import contextlib
import json
import logging
import os
import time

from services.worker.config import WorkerServiceConfig
from shared.config import load_config
from shared.lifecycle import setup_logging

logger = logging.getLogger(__name__)

_MAX_LINE_BYTES = 1 << 20


def wait_for_assignment(role: str, args: list[str]) -> list[str] | None:
    """Warm up for ``args``, then block until the launcher hands this process over; the full
    argument list, or None if it never will."""
    started_s = time.monotonic()
    config = load_config(WorkerServiceConfig, role, args)
    setup_logging(config.worker.log_level)
    warm_up(config)
    logger.info(
        "standby warmed up in %.2f s after its imports; waiting for an assignment",
        time.monotonic() - started_s,
    )
    with contextlib.suppress(OSError):  # stdin not writable (a pipe, /dev/null): none waits
        os.write(0, b"warm\n")
    try:
        line = _read_line(0)
    except KeyboardInterrupt:  # Ctrl-C in the launcher's terminal: the launcher stops us
        return None
    if not line:
        logger.info("standby released without an assignment")
        return None
    extra = json.loads(line)
    if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
        raise ValueError(f"a standby's assignment is a JSON list of strings, got {line[:200]!r}")
    with open(os.devnull, "rb") as null:  # the socket's job is done
        os.dup2(null.fileno(), 0)
    return [*args, *extra]


def warm_up(config: WorkerServiceConfig) -> None:
    """Pay now what the first use of this config's engine and KV transport would."""
    if config.engine.engine == "torch":
        import torch

        import shared.engine.checkpoint
        import shared.engine.torch_runner  # imported to be warm

        # The first op sets up the CPU kernels. No CUDA context: idle, it would hold GPU memory.
        torch.zeros(1).add_(1)
    if config.engine.engine == "vllm":
        # Importing vLLM takes about 10 s here; starting its engine is left to the worker
        # (its model and cache size are the worker's).
        import shared.engine.vllm_engine  # noqa: F401 - imported to be warm
    if config.worker.kv_transfer in ("auto", "nixl"):
        from shared.kv_transfer import NixlAgent, TransportUnavailable, nixl_status

        if nixl_status()[0]:
            try:
                NixlAgent(f"standby-{os.getpid()}").close()
            except TransportUnavailable as exc:
                logger.info("standby: nixl not warmed error=%s", exc)


def _read_line(fd: int) -> bytes:
    """Bytes up to and including the first newline; what came before end of file if none."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
        if len(data) > _MAX_LINE_BYTES:
            raise ValueError("a standby's assignment is longer than 1 MiB")
    return data
