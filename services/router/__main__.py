"""baton-router: the KV-aware router (answers RouteRequests on the bus)."""

import dataclasses
import logging
import sys
from collections.abc import Sequence

from services.router.config import RouterConfig
from services.router.service import serve
from shared.config import describe, instance_id, load_config
from shared.lifecycle import run_async, setup_logging


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(RouterConfig, "router", argv, description="Baton KV-aware router")
    if not config.router_id:
        config = dataclasses.replace(config, router_id=instance_id("router"))
    setup_logging(config.log_level)
    logging.getLogger(__name__).info("config %s", describe(config))
    run_async(serve(config))
    sys.exit(0)


if __name__ == "__main__":
    main()
