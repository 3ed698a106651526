"""baton-planner: the autoscaler (decides how many workers each pool should run)."""

import dataclasses
import importlib.util
import logging
import sys
from collections.abc import Sequence

from services.planner.config import PlannerConfig
from services.planner.connectors import KUBERNETES_NEEDS_EXTRA
from services.planner.service import serve
from shared.config import describe, instance_id, load_config
from shared.lifecycle import run_async, setup_logging


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(PlannerConfig, "planner", argv, description="Baton planner (autoscaler)")
    if config.connector == "kubernetes":
        _check_kubernetes(config)
    if not config.planner_id:
        config = dataclasses.replace(config, planner_id=instance_id("planner"))
    setup_logging(config.log_level)
    if config.log_level.lower() != "debug":
        # httpx2 (lightkube's HTTP client) logs every request at INFO; the connector logs each
        # scaling once, with its outcome.
        logging.getLogger("httpx2").setLevel(logging.WARNING)
    logging.getLogger(__name__).info("config %s", describe(config))
    run_async(serve(config))
    sys.exit(0)


def _check_kubernetes(config: PlannerConfig) -> None:
    """Exit 2 with the reason when the kubernetes connector cannot start: lightkube missing,
    or no API server and credentials to be found. An API that is down is no reason: the
    planner starts, and retries its writes."""
    reason = None
    if importlib.util.find_spec("lightkube") is None:
        reason = KUBERNETES_NEEDS_EXTRA
    else:
        from services.planner.kubernetes import load_kube_config

        try:
            load_kube_config(config.k8s)
        except ValueError as exc:
            reason = str(exc)
    if reason is not None:
        print(f"baton-planner: {reason}", file=sys.stderr)  # noqa: T201 - CLI output
        sys.exit(2)


if __name__ == "__main__":
    main()
