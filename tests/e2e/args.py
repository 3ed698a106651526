"""Service flags and cluster shapes several end-to-end tests share."""

from collections.abc import Awaitable, Callable
from typing import Any

from services.launcher.cluster import LocalCluster

# Router flags: prefill every prompt on a prefill worker (however short, however long the
# prefill pool's queue), for tests of the remote prefill path itself.
ALWAYS_REMOTE = (
    "--min-remote-prefill-tokens", "1",
    "--min-remote-prefill-fraction", "0",
    "--max-remote-prefill-extra-wait-s", "inf",
)  # fmt: skip

# A small torch engine (random weights) for tests of real outputs.
TORCH = ("--engine", "torch", "--num-kv-blocks", "1024", "--max-model-len", "4096")
# The router decides local or remote prefill; a frontend that waits for its answer (rather
# than placing by itself after 50 ms on a busy machine) makes that decision the router's.
WAIT_FOR_ROUTER = ("--route-timeout-s", "10")


async def start_remote_prefill(
    start_cluster: Callable[..., Awaitable[LocalCluster]],
    engine_args: tuple[str, ...],
    **kwargs: Any,
) -> LocalCluster:
    """One prefill and one decode worker with ``engine_args``, and a router that sends every
    prompt to the prefill worker (``kwargs``: the namespace, say)."""
    return await start_cluster(
        num_workers=1,
        worker_args=engine_args,
        num_prefill=1,
        prefill_args=engine_args,
        num_routers=1,
        router_args=ALWAYS_REMOTE,
        frontend_args=WAIT_FOR_ROUTER,
        **kwargs,
    )
