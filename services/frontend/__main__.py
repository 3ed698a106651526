"""baton-frontend: the OpenAI-compatible HTTP server."""

import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

from services.frontend.config import FrontendConfig
from services.frontend.procs import serve_procs
from services.frontend.service import serve
from shared.config import describe, instance_id, load_config
from shared.lifecycle import raise_fd_limit, run_async, setup_logging


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(
        FrontendConfig, "frontend", argv, description="Baton frontend (OpenAI-compatible HTTP)"
    )
    setup_logging(config.log_level)
    logging.getLogger(__name__).info(
        "config %s open_files_limit=%d", describe(config), raise_fd_limit()
    )
    if config.nice:
        os.nice(config.nice)  # before --procs starts the others: they inherit it
    if config.procs != 1:
        code = 0

        async def supervise() -> None:
            nonlocal code
            code = await serve_procs(config, sys.argv[1:] if argv is None else argv)

        run_async(supervise())
        sys.exit(code)
    if not config.frontend_id:
        config = dataclasses.replace(config, frontend_id=instance_id("frontend"))
    run_async(serve(config))
    sys.exit(0)


if __name__ == "__main__":
    main()
