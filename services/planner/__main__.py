"""baton-planner: the autoscaler (decides how many workers each pool should run)."""

import dataclasses
import logging
import sys
from collections.abc import Sequence

from services.planner.config import PlannerConfig
from services.planner.connectors import KUBERNETES_NOT_BUILT
from services.planner.service import serve
from shared.config import describe, instance_id, load_config
from shared.lifecycle import run_async, setup_logging


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(PlannerConfig, "planner", argv, description="Baton planner (autoscaler)")
    if config.connector == "kubernetes":
        print(f"baton-planner: {KUBERNETES_NOT_BUILT}", file=sys.stderr)  # noqa: T201 - CLI output
        sys.exit(2)
    if not config.planner_id:
        config = dataclasses.replace(config, planner_id=instance_id("planner"))
    setup_logging(config.log_level)
    logging.getLogger(__name__).info("config %s", describe(config))
    run_async(serve(config))
    sys.exit(0)


if __name__ == "__main__":
    main()
