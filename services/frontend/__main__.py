"""baton-frontend: the OpenAI-compatible HTTP server."""

import dataclasses
import logging
import sys
from collections.abc import Sequence

from services.frontend.config import FrontendConfig
from services.frontend.service import serve
from shared.config import describe, instance_id, load_config
from shared.lifecycle import run_async, setup_logging


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(
        FrontendConfig, "frontend", argv, description="Baton frontend (OpenAI-compatible HTTP)"
    )
    if not config.frontend_id:
        config = dataclasses.replace(config, frontend_id=instance_id("frontend"))
    setup_logging(config.log_level)
    logging.getLogger(__name__).info("config %s", describe(config))
    run_async(serve(config))
    sys.exit(0)


if __name__ == "__main__":
    main()
