"""What baton-bench asks the server besides completions: its models and its metrics."""

import logging

import aiohttp

logger = logging.getLogger(__name__)


async def first_model(url: str) -> str:
    """The id of the first model the server lists."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(f"{url}/v1/models") as resp,
    ):
        resp.raise_for_status()
        models = (await resp.json())["data"]
    if not models:
        raise ValueError(f"{url}/v1/models lists no model")
    return str(models[0]["id"])


async def scrape_metrics(url: str) -> list[str]:
    """The ``baton_*`` sample lines of a Prometheus text endpoint; [] (and a warning) if it
    cannot be read: the run's results matter more than the server's counters."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.get(url) as resp,
        ):
            resp.raise_for_status()
            text = await resp.text()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        logger.warning("metrics scrape failed url=%s error=%r", url, exc)
        return []
    return [line for line in text.splitlines() if line.startswith("baton_")]
