"""baton-prefill, baton-decode, ``python -m services.worker --role ROLE``: one engine worker.

Both roles are the same program (one shell, one of two roles). Environment variables are read
per role, ``BATON_DECODE_*`` or ``BATON_PREFILL_*``, then ``BATON_*`` for every service.

``--standby`` as the first argument: start as a standby, imported and warm but unregistered,
and serve only once handed the rest of its arguments on stdin (``standby.py``).
"""

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

from services.worker.config import ROLES, WorkerServiceConfig
from services.worker.service import serve
from services.worker.standby import wait_for_assignment
from shared.config import describe, instance_id, load_config
from shared.lifecycle import run_async, setup_logging

_DESCRIPTIONS = {
    "prefill": "Baton prefill worker: computes prompts and hands their KV to decode workers",
    "decode": "Baton decode worker: streams tokens, prefilling here or pulling the KV",
}


def main(argv: Sequence[str] | None = None, role: str | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    is_standby = args[:1] == ["--standby"]
    if is_standby:
        args = args[1:]
    if role is not None:
        args = ["--role", role, *args]
    if is_standby:
        assigned = wait_for_assignment(role or _peek_role(args), args)
        if assigned is None:
            sys.exit(0)
        args = assigned
    role = role or _peek_role(args)
    config = load_config(WorkerServiceConfig, role, args, description=_DESCRIPTIONS[role])
    if not config.worker.worker_id:
        worker = dataclasses.replace(config.worker, worker_id=instance_id(role))
        config = dataclasses.replace(config, worker=worker)
    setup_logging(config.worker.log_level)
    logging.getLogger().setLevel(config.worker.log_level.upper())  # a standby set it already
    logging.getLogger(__name__).info("config %s", describe(config))
    run_async(serve(config))
    sys.exit(0)


def _peek_role(args: list[str]) -> str:
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--role", choices=sorted(ROLES), default="decode")
    role: str = peek.parse_known_args(args)[0].role
    return role


def prefill_main() -> None:
    main(role="prefill")


def decode_main() -> None:
    main(role="decode")


if __name__ == "__main__":
    main()
