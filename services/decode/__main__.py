"""baton-decode: a worker that decodes (and prefills prompts that are short or cached here)."""

import dataclasses
import logging
import sys
from collections.abc import Sequence

from services.decode.config import DecodeConfig
from services.decode.service import serve
from shared.config import describe, instance_id, load_config
from shared.lifecycle import run_async, setup_logging


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(
        DecodeConfig, "decode", argv, description="Baton decode worker (serves an engine on NATS)"
    )
    if not config.worker.worker_id:
        worker = dataclasses.replace(config.worker, worker_id=instance_id("decode"))
        config = dataclasses.replace(config, worker=worker)
    setup_logging(config.worker.log_level)
    logging.getLogger(__name__).info("config %s", describe(config))
    run_async(serve(config))
    sys.exit(0)


if __name__ == "__main__":
    main()
