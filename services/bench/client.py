"""The HTTP side: one process's share of the requests, each sent when due and its stream read.

Every request runs in its own task whatever the others are doing (open loop). TTFT ends at
the first SSE event that carries a choice; the token count is the usage event's
``completion_tokens`` (``stream_options.include_usage``), else the number of text events.
"""

import asyncio
import logging
import math
import resource
import time
from collections.abc import MutableSequence
from dataclasses import dataclass, field

import aiohttp
import msgspec

from services.bench.outcome import (
    Kind,
    Objectives,
    Outcome,
    Verdict,
    time_per_output_token,
    verdict,
)
from services.bench.progress import Tally
from services.bench.workload import RequestPlan, prompt_token_ids

logger = logging.getLogger(__name__)

_MAX_ERROR_CHARS = 200


@dataclass(frozen=True, slots=True, kw_only=True)
class Share:
    """What one client process sends; picklable."""

    url: str
    model: str
    seed: int
    plans: list[RequestPlan]
    objectives: Objectives
    send_slo: bool
    shed_statuses: frozenset[int]
    request_timeout_s: float


@dataclass(slots=True)
class ShareResult:
    outcomes: list[Outcome] = field(default_factory=list)
    cpu_s_by_second: list[float] = field(default_factory=list)  # this process, per second
    stopped_s: float | None = None  # when a stop came, if one did (seconds from t0)


class _Choice(msgspec.Struct):
    text: str | None = None


class _PromptDetails(msgspec.Struct):
    cached_tokens: int = 0


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: _PromptDetails | None = None


class _Error(msgspec.Struct):
    message: str = ""
    type: str = ""
    code: int | str | None = None


class _Event(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: _Error | None = None


_event_decoder = msgspec.json.Decoder(_Event)


def cpu_seconds() -> float:
    """User plus system CPU of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def request_body(share: Share, plan: RequestPlan) -> bytes:
    body: dict[str, object] = {
        "model": share.model,
        "prompt": prompt_token_ids(plan, share.seed),
        "max_tokens": plan.num_output_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if share.send_slo:
        if share.objectives.ttft_s is not None:
            body["slo_ttft_ms"] = share.objectives.ttft_s * 1000
        if share.objectives.tpot_s is not None:
            body["slo_tpot_ms"] = share.objectives.tpot_s * 1000
    if plan.priority is not None:
        body["priority"] = plan.priority
    return msgspec.json.encode(body)


def _retry_after_s(value: str | None) -> float:
    try:
        return float(value) if value is not None else math.nan
    except ValueError:  # an HTTP date: not what Baton sends
        return math.nan


async def _read_stream(resp: aiohttp.ClientResponse, outcome: Outcome, sent: float) -> None:
    """Follow one SSE stream to ``[DONE]``; fills the outcome's times and kind."""
    first = last = math.nan
    num_text_events, num_usage_tokens, is_done = 0, -1, False
    error = ""
    async for line in resp.content:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            is_done = True
            break
        event = _event_decoder.decode(data)
        if event.error is not None and not error:
            error = f"{event.error.code} {event.error.type}: {event.error.message}"
        if event.choices:
            last = time.monotonic()
            if math.isnan(first):
                first = last
            num_text_events += sum(1 for c in event.choices if c.text)
        if event.usage is not None:
            num_usage_tokens = event.usage.completion_tokens
            outcome.num_prompt_tokens = event.usage.prompt_tokens
            details = event.usage.prompt_tokens_details
            outcome.num_cached_tokens = details.cached_tokens if details else 0
    outcome.latency_s = time.monotonic() - sent
    num_tokens = num_usage_tokens if num_usage_tokens >= 0 else num_text_events
    outcome.num_output_tokens = num_tokens
    outcome.ttft_s = first - sent
    outcome.tpot_s = time_per_output_token(first, last, num_tokens)
    if error:
        outcome.kind, outcome.error = Kind.SSE_ERROR, error[:_MAX_ERROR_CHARS]
    elif not is_done:
        outcome.kind, outcome.error = Kind.INCOMPLETE, "stream ended without [DONE]"
    else:
        outcome.kind = Kind.OK


async def send(
    session: aiohttp.ClientSession, share: Share, body: bytes, outcome: Outcome, t0: float
) -> None:
    """Send one request and fill its outcome; raises only on cancellation (the outcome then
    stays ``aborted``)."""
    sent = time.monotonic()
    outcome.sent_s = sent - t0
    try:
        async with (
            asyncio.timeout(share.request_timeout_s),
            session.post(
                f"{share.url}/v1/completions",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as resp,
        ):
            outcome.status = resp.status
            if resp.status == 200:
                await _read_stream(resp, outcome, sent)
                return
            text = await resp.text(errors="replace")
            outcome.latency_s = time.monotonic() - sent
            if resp.status in share.shed_statuses:
                outcome.kind = Kind.SHED
                outcome.retry_after_s = _retry_after_s(resp.headers.get("Retry-After"))
            else:
                outcome.kind = Kind.HTTP_ERROR
            outcome.error = text[:_MAX_ERROR_CHARS]
    except TimeoutError:
        outcome.kind, outcome.error = Kind.TIMEOUT, f"over {share.request_timeout_s} s"
    except (aiohttp.ClientError, OSError) as exc:
        outcome.kind = Kind.CONNECTION_ERROR
        outcome.error = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
    except msgspec.DecodeError as exc:
        outcome.kind, outcome.error = Kind.SSE_ERROR, f"bad event: {exc}"[:_MAX_ERROR_CHARS]


async def _send_counted(
    session: aiohttp.ClientSession,
    share: Share,
    body: bytes,
    outcome: Outcome,
    t0: float,
    counters: MutableSequence[int],
    base: int,
) -> None:
    counters[base + Tally.SENT] += 1
    counters[base + Tally.IN_FLIGHT] += 1
    try:
        await send(session, share, body, outcome, t0)
    finally:
        counters[base + Tally.IN_FLIGHT] -= 1
        if outcome.kind is not Kind.ABORTED:
            counters[base + Tally.DONE] += 1
            match verdict(outcome, share.objectives):
                case Verdict.GOOD:
                    counters[base + Tally.GOOD] += 1
                case Verdict.SHED:
                    counters[base + Tally.SHED] += 1
                case Verdict.ERROR:
                    counters[base + Tally.ERRORS] += 1
                case Verdict.SLO_MISS | Verdict.ABORTED:
                    pass


async def _drive(
    session: aiohttp.ClientSession,
    share: Share,
    t0: float,
    counters: MutableSequence[int],
    base: int,
    outcomes: list[Outcome],
) -> None:
    """Start each request when due, then wait for the last; on cancellation, cancel those
    in flight (they stay ``aborted``)."""
    tasks: set[asyncio.Task[None]] = set()
    try:
        for plan in share.plans:
            body = request_body(share, plan)  # built before it is due, off the clock
            delay = t0 + plan.due_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            outcome = Outcome(plan.index, plan.stage, plan.due_s, plan.priority)
            outcomes.append(outcome)
            task = asyncio.create_task(
                _send_counted(session, share, body, outcome, t0, counters, base)
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.wait(set(tasks))
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(set(tasks))


async def _sample_cpu(t0: float, cpu_s_by_second: list[float]) -> None:
    """Append this process's CPU seconds spent in each whole second after ``t0``."""
    before = cpu_seconds()
    while True:
        await asyncio.sleep(max(0.0, t0 + len(cpu_s_by_second) + 1 - time.monotonic()))
        now = cpu_seconds()
        cpu_s_by_second.append(now - before)
        before = now


async def run_share(
    share: Share,
    t0: float,
    counters: MutableSequence[int],
    base: int,
    stopping: asyncio.Event,
) -> ShareResult:
    """Send the share's requests on the schedule that starts at monotonic time ``t0``; when
    ``stopping`` is set, send no more and abort those in flight."""
    result = ShareResult()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        drive = asyncio.create_task(_drive(session, share, t0, counters, base, result.outcomes))
        sampler = asyncio.create_task(_sample_cpu(t0, result.cpu_s_by_second))
        stop = asyncio.create_task(stopping.wait())
        try:
            await asyncio.wait({drive, stop}, return_when=asyncio.FIRST_COMPLETED)
            if stop.done():
                result.stopped_s = time.monotonic() - t0
        finally:
            for task in (drive, sampler, stop):
                task.cancel()
            await asyncio.wait({drive, sampler, stop})
        if not drive.cancelled():
            drive.result()  # a bug in the driver surfaces here
    return result
