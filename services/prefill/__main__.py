"""baton-prefill: a worker that computes prompts and hands their KV to decode workers."""

import dataclasses
import logging
import sys
from collections.abc import Sequence

from services.prefill.config import PrefillConfig
from services.prefill.service import serve
from shared.config import describe, instance_id, load_config
from shared.lifecycle import run_async, setup_logging


def main(argv: Sequence[str] | None = None) -> None:
    config = load_config(
        PrefillConfig, "prefill", argv, description="Baton prefill worker (disaggregated prefill)"
    )
    if not config.worker.worker_id:
        worker = dataclasses.replace(config.worker, worker_id=instance_id("prefill"))
        config = dataclasses.replace(config, worker=worker)
    setup_logging(config.worker.log_level)
    logging.getLogger(__name__).info("config %s", describe(config))
    run_async(serve(config))
    sys.exit(0)


if __name__ == "__main__":
    main()
