"""The HTTP side: one process's share of the requests, each sent when due and its stream read.

Every request runs in its own task whatever the others are doing (open loop). TTFT ends at
the first SSE event that carries a choice; the token count is the usage event's
``completion_tokens`` (``stream_options.include_usage``), else the number of text events.
"""

import asyncio
import gc
import logging
import math
import resource
import time
from collections.abc import MutableSequence
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
import msgspec

from services.bench import http1
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


class _StreamReader:
    """Follows one SSE stream, a line at a time, to ``[DONE]``; fills the outcome's times
    and kind (``finish``)."""

    __slots__ = (
        "error",
        "first",
        "is_done",
        "last",
        "num_text_events",
        "num_usage_tokens",
        "outcome",
    )

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.first = self.last = math.nan
        self.num_text_events, self.num_usage_tokens = 0, -1
        self.is_done = False
        self.error = ""

    def line(self, line: bytes) -> None:
        """One line of the stream (the line ending stripped or not)."""
        outcome = self.outcome
        if self.is_done or not line.startswith(b"data:"):
            return
        data = line[5:].strip()
        if data == b"[DONE]":
            self.is_done = True
            return
        event = _event_decoder.decode(data)
        if event.error is not None and not self.error:
            self.error = f"{event.error.code} {event.error.type}: {event.error.message}"
        if event.choices:
            self.last = time.monotonic()
            if math.isnan(self.first):
                self.first = self.last
            self.num_text_events += sum(1 for c in event.choices if c.text)
        if event.usage is not None:
            self.num_usage_tokens = event.usage.completion_tokens
            outcome.num_prompt_tokens = event.usage.prompt_tokens
            details = event.usage.prompt_tokens_details
            outcome.num_cached_tokens = details.cached_tokens if details else 0

    def finish(self, sent: float) -> None:
        outcome = self.outcome
        outcome.latency_s = time.monotonic() - sent
        num_tokens = self.num_usage_tokens if self.num_usage_tokens >= 0 else self.num_text_events
        outcome.num_output_tokens = num_tokens
        outcome.ttft_s = self.first - sent
        outcome.tpot_s = time_per_output_token(self.first, self.last, num_tokens)
        if self.error:
            outcome.kind, outcome.error = Kind.SSE_ERROR, self.error[:_MAX_ERROR_CHARS]
        elif not self.is_done:
            outcome.kind, outcome.error = Kind.INCOMPLETE, "stream ended without [DONE]"
        else:
            outcome.kind = Kind.OK


def _refused(outcome: Outcome, share: Share, text: str, retry_after: str | None) -> None:
    """A response other than 200: shed (``share.shed_statuses``) or an HTTP error."""
    if outcome.status in share.shed_statuses:
        outcome.kind = Kind.SHED
        outcome.retry_after_s = _retry_after_s(retry_after)
    else:
        outcome.kind = Kind.HTTP_ERROR
    outcome.error = text[:_MAX_ERROR_CHARS]


async def send(
    session: aiohttp.ClientSession, share: Share, body: bytes, outcome: Outcome, t0: float
) -> None:
    """Send one request through aiohttp (``https://``) and fill its outcome; raises only on
    cancellation (the outcome then stays ``aborted``)."""
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
                reader = _StreamReader(outcome)
                async for line in resp.content:
                    reader.line(line)
                    if reader.is_done:
                        break
                reader.finish(sent)
                return
            text = await resp.text(errors="replace")
            outcome.latency_s = time.monotonic() - sent
            _refused(outcome, share, text, resp.headers.get("Retry-After"))
    except TimeoutError:
        outcome.kind, outcome.error = Kind.TIMEOUT, f"over {share.request_timeout_s} s"
    except (aiohttp.ClientError, OSError) as exc:
        outcome.kind = Kind.CONNECTION_ERROR
        outcome.error = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
    except msgspec.DecodeError as exc:
        outcome.kind, outcome.error = Kind.SSE_ERROR, f"bad event: {exc}"[:_MAX_ERROR_CHARS]


async def send_lean(
    client: http1.Client, share: Share, request: bytes, outcome: Outcome, t0: float
) -> None:
    """``send`` through ``http1.Client`` (``http://``): the same outcome, at a fraction of
    the client's CPU."""
    sent = time.monotonic()
    outcome.sent_s = sent - t0
    reader = _StreamReader(outcome)
    response = http1.Response(asyncio.get_running_loop(), reader.line)
    try:
        async with asyncio.timeout(share.request_timeout_s):
            outcome.new_connection = await client.send(request, response)
    except TimeoutError:
        outcome.kind, outcome.error = Kind.TIMEOUT, f"over {share.request_timeout_s} s"
        return
    except (OSError, http1.ProtocolError) as exc:
        outcome.status = response.status
        outcome.kind = Kind.CONNECTION_ERROR
        outcome.error = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
        return
    except msgspec.DecodeError as exc:
        outcome.status = response.status
        outcome.kind, outcome.error = Kind.SSE_ERROR, f"bad event: {exc}"[:_MAX_ERROR_CHARS]
        return
    outcome.status = response.status
    if response.status == 200:
        reader.finish(sent)
        return
    outcome.latency_s = time.monotonic() - sent
    text = response.body.decode("utf-8", "replace")
    _refused(outcome, share, text, response.headers.get("retry-after"))


class _Transport(Protocol):
    """How a share's requests go out: ``prepare`` turns a JSON body into what ``send`` takes
    (built before the request is due), ``send`` sends it and fills the outcome."""

    def prepare(self, body: bytes) -> bytes: ...

    async def send(self, request: bytes, outcome: Outcome, t0: float) -> None: ...


class _Aiohttp:
    def __init__(self, session: aiohttp.ClientSession, share: Share) -> None:
        self.session, self.share = session, share

    def prepare(self, body: bytes) -> bytes:
        return body

    async def send(self, request: bytes, outcome: Outcome, t0: float) -> None:
        await send(self.session, self.share, request, outcome, t0)


class _Lean:
    def __init__(self, client: http1.Client, share: Share) -> None:
        self.client, self.share = client, share

    def prepare(self, body: bytes) -> bytes:
        return self.client.post_bytes("/v1/completions", body)

    async def send(self, request: bytes, outcome: Outcome, t0: float) -> None:
        await send_lean(self.client, self.share, request, outcome, t0)


async def _send_counted(
    transport: _Transport,
    share: Share,
    request: bytes,
    outcome: Outcome,
    t0: float,
    counters: MutableSequence[int],
    base: int,
) -> None:
    counters[base + Tally.SENT] += 1
    counters[base + Tally.IN_FLIGHT] += 1
    try:
        await transport.send(request, outcome, t0)
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
    transport: _Transport,
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
            # Built before it is due, off the clock.
            request = transport.prepare(request_body(share, plan))
            delay = t0 + plan.due_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            outcome = Outcome(plan.index, plan.stage, plan.due_s, plan.priority)
            outcomes.append(outcome)
            task = asyncio.create_task(
                _send_counted(transport, share, request, outcome, t0, counters, base)
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


async def _freeze_survivors(interval_s: float = 1.0) -> None:
    """Move what survived so far out of the garbage collector's reach, once a second, until
    cancelled. The run's outcomes and connections pile up in its oldest generation, and a
    full collection over tens of thousands of them stopped a client here for 85-105 ms,
    which it then counted in the latencies of every request it was reading. The client
    makes almost no cyclic garbage (such a collection found 0-6 objects), and objects
    freed by their reference count are freed frozen or not."""
    try:
        while True:
            await asyncio.sleep(interval_s)
            gc.freeze()
    finally:
        gc.unfreeze()


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
    if share.url.startswith("http://"):
        client = http1.Client(share.url)
        try:
            await _run(_Lean(client, share), share, t0, counters, base, stopping, result)
        finally:
            client.close()
        return result
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await _run(_Aiohttp(session, share), share, t0, counters, base, stopping, result)
    return result


async def _run(
    transport: _Transport,
    share: Share,
    t0: float,
    counters: MutableSequence[int],
    base: int,
    stopping: asyncio.Event,
    result: ShareResult,
) -> None:
    drive = asyncio.create_task(_drive(transport, share, t0, counters, base, result.outcomes))
    sampler = asyncio.create_task(_sample_cpu(t0, result.cpu_s_by_second))
    freezer = asyncio.create_task(_freeze_survivors())
    stop = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({drive, stop}, return_when=asyncio.FIRST_COMPLETED)
        if stop.done():
            result.stopped_s = time.monotonic() - t0
    finally:
        for task in (drive, sampler, freezer, stop):
            task.cancel()
        await asyncio.wait({drive, sampler, freezer, stop})
    if not drive.cancelled():
        drive.result()  # a bug in the driver surfaces here
