"""baton: the umbrella command. `baton up` runs a whole local cluster until Ctrl-C."""

import logging
import os
import sys
from collections.abc import Sequence

from services.launcher.cluster import local_cluster
from services.launcher.config import UpConfig
from shared.config import load_config
from shared.lifecycle import run_async, setup_logging, shutdown_event

logger = logging.getLogger(__name__)

USAGE = """usage: baton {up,bench} [options]

Commands:
  up     start a local cluster (NATS, etcd, workers, frontend) and serve until Ctrl-C
  bench  open-loop load against an OpenAI-compatible endpoint (same as baton-bench)

Each service also has its own command: baton-frontend, baton-decode (see --help).
`baton up --help` lists the options."""


async def up(config: UpConfig) -> int:
    """Serve until SIGTERM/SIGINT, restarting any process that exits (ClusterSpec.supervise);
    then stop everything in order: frontend, workers, routers, servers."""
    stopping = shutdown_event()
    try:
        async with local_cluster(config.cluster_spec()) as cluster:
            ready = f"Baton is up: {cluster.url}/v1 (model {config.model!r}); Ctrl-C stops it"
            print(ready, flush=True)  # noqa: T201 - CLI output
            try:
                await cluster.serve(stopping)
            except Exception:
                logger.exception("supervision failed; stopping the cluster")
                return 1
    except (RuntimeError, TimeoutError) as exc:  # start-up: a port in use, a child that exited
        print(f"baton: {exc}", file=sys.stderr)  # noqa: T201 - CLI output
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)  # noqa: T201 - CLI output
        sys.exit(0 if args else 2)
    if args[0] == "bench":
        # A separate program (the load client shares nothing with the launcher).
        os.execv(sys.executable, [sys.executable, "-m", "services.bench", *args[1:]])
    if args[0] != "up":
        print(f"baton: unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr)  # noqa: T201 - CLI output
        sys.exit(2)
    config = load_config(
        UpConfig, "up", _bare_secure(args[1:]), description="Start a local Baton cluster"
    )
    setup_logging(config.log_level)
    code = 0

    async def run() -> None:
        nonlocal code
        code = await up(config)

    run_async(run())
    sys.exit(code)


def _bare_secure(args: list[str]) -> list[str]:
    """``--secure`` (or ``--planner``) alone means ``--secure=true`` (the config's boolean
    flags take a value)."""
    expanded = []
    for i, arg in enumerate(args):
        following = args[i + 1] if i + 1 < len(args) else "-"
        is_bare = arg in ("--secure", "--planner") and following.startswith("-")
        expanded.append(f"{arg}=true" if is_bare else arg)
    return expanded


if __name__ == "__main__":
    main()
