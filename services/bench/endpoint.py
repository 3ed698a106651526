"""What baton-bench asks the server besides completions: its models and its metrics."""

import asyncio
import logging
import time

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


def parse_samples(lines: list[str], names: tuple[str, ...]) -> dict[str, float]:
    """``name{labels}`` -> value for the sample lines of the metrics in ``names``."""
    samples: dict[str, float] = {}
    for line in lines:
        key, _, value = line.rpartition(" ")
        if key.partition("{")[0] in names:
            try:
                samples[key] = float(value)
            except ValueError:
                continue
    return samples


class MetricsWatcher:
    """Samples some gauges of a /metrics endpoint once a second while a run lasts: what the
    server did over time (workers per role, say) beside what the clients saw."""

    def __init__(self, url: str, names: tuple[str, ...], interval_s: float = 1.0) -> None:
        self.url = url
        self.names = names
        self.interval_s = interval_s
        self.at: list[float] = []  # wall clock (epoch seconds) of each sample
        self.samples: list[dict[str, float]] = []

    async def run(self) -> None:
        """Sample until cancelled."""
        while True:
            lines = await scrape_metrics(self.url)
            if lines:
                self.at.append(time.time())
                self.samples.append(parse_samples(lines, self.names))
            await asyncio.sleep(self.interval_s)

    def times_s(self, started_at: float) -> list[float]:
        """The samples' times in seconds since ``started_at`` (the schedule's start)."""
        return [at - started_at for at in self.at]

    def series(self) -> dict[str, list[float | None]]:
        """Each sampled series by its full name, aligned with ``t_s`` (None where missing)."""
        keys = sorted({key for sample in self.samples for key in sample})
        return {key: [sample.get(key) for sample in self.samples] for key in keys}
