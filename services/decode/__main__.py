"""baton-decode: a worker serving an engine over NATS (aggregated prefill+decode for now)."""

import dataclasses
import logging
import sys
from collections.abc import Sequence

from services.decode.config import DecodeConfig, default_worker_id
from services.decode.service import serve
from shared.config import describe, load_config
from shared.lifecycle import run_async, setup_logging


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(
        DecodeConfig, "decode", argv, description="Baton decode worker (serves an engine on NATS)"
    )
    if not config.worker_id:
        config = dataclasses.replace(config, worker_id=default_worker_id())
    setup_logging(config.log_level)
    logging.getLogger(__name__).info("config %s", describe(config))
    run_async(serve(config))
    sys.exit(0)


if __name__ == "__main__":
    main()
