"""One reader of Prometheus text pages for every test that checks a service's counters."""

import aiohttp


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of metric ``name``'s samples in a text page, matched by exact name, of every
    label set or only those carrying ``labels``; 0 when there is none (a labelled counter
    appears only once it has counted)."""
    return sum(_samples(text, name, labels))


async def metric(
    url: str, name: str, session: aiohttp.ClientSession | None = None, **labels: str
) -> float:
    """The sum of ``name``'s samples at ``url``/metrics; ``AssertionError`` when the page has
    none, so that a renamed metric fails its test rather than reading as 0."""
    if session is None:
        async with aiohttp.ClientSession() as own:
            return await metric(url, name, own, **labels)
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    samples = _samples(text, name, labels)
    if not samples:
        raise AssertionError(f"{name} {labels or ''} not in {url}/metrics")
    return sum(samples)


def _samples(text: str, name: str, labels: dict[str, str]) -> list[float]:
    values = []
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        sample_name, _, label_text = key.partition("{")
        if sample_name == name and all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            values.append(float(value))
    return values
