"""baton-bench: open-loop load against an OpenAI-compatible endpoint; a table per stage."""

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from services.bench import plot
from services.bench.config import BenchConfig, expand_bare_flags
from services.bench.report import format_table
from services.bench.runner import run_bench
from shared.config import describe, load_config
from shared.lifecycle import run_async, setup_logging

logger = logging.getLogger(__name__)

DESCRIPTION = """Open-loop load generator for an OpenAI-compatible endpoint (/v1/completions,
streamed). Requests are sent when due, never waiting for each other; each is classified good
(completed within --slo-ttft-ms and --slo-tpot-ms), slo missed, shed (--shed-statuses) or
error. Prints a table per stage; --out writes JSON, --plot a PNG. Example:
baton-bench --stages 20:30,60:10,20:30 --slo-ttft-ms 2000 --slo-tpot-ms 100 --out r.json"""


def _fail(message: str) -> None:
    print(f"baton-bench: {message}", file=sys.stderr)  # noqa: T201 - CLI output
    sys.exit(1)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    config = load_config(BenchConfig, "bench", expand_bare_flags(args), description=DESCRIPTION)
    setup_logging(config.log_level)
    logger.info("config %s", describe(config))
    try:
        if config.plot:
            plot.check_available()
        document: dict[str, Any] = {}

        async def run() -> None:
            document.update(await run_bench(config))

        run_async(run())
    except plot.PlotUnavailable as exc:
        _fail(str(exc))
    except FileNotFoundError as exc:
        _fail(f"no such file: {exc.filename}")
    except (aiohttp.ClientError, OSError) as exc:
        _fail(f"cannot reach {config.url}: {exc}")
    except ValueError as exc:
        _fail(str(exc))
    print(format_table(document), flush=True)  # noqa: T201 - CLI output
    if config.out:
        Path(config.out).write_text(json.dumps(document, indent=1) + "\n")
        logger.info("results written path=%s", config.out)
    if config.plot:
        plot.draw(document, config.plot)
        logger.info("plot written path=%s", config.plot)
    sys.exit(0)


if __name__ == "__main__":
    main()
