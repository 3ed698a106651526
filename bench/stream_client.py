"""The client side of bench/streams.py: one process's share of streaming chat completions.

Each process runs one asyncio loop (uvloop where installed) with one lean HTTP/1.1 client
(``services/bench/http1.py``, as ``baton bench`` uses: each response is parsed in its
connection's callback, with no task wake, stream reader or response object per line), starts its
streams on the shared ramp schedule, keeps its open-stream counters in shared memory for the
orchestrator's sampler, and sends back one compact row per stream when all are done.
"""

import asyncio
import math
import resource
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from services.bench import http1

# A stream's row: (sent_s, ttft_s, end_s, tpot_s, num_tokens, error); times from the start
# signal, NaN where not measured, error "" for a completed stream.
Row = tuple[float, float, float, float, int, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadSpec:
    """What every client process needs; picklable for spawn."""

    url: str
    model: str
    num_streams: int
    num_procs: int
    max_tokens: int
    prompt_words: int
    ignore_eos: bool
    ramp_s: float
    stream_timeout_s: float
    deadline_s: float
    # Loopback only: client process i connects from 127.0.0.(i + 1), so that each has its own
    # ~28,000 ephemeral ports (one address runs out near 28,000 open streams).
    spread_sources: bool = False


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None


class _Usage(msgspec.Struct):
    completion_tokens: int = 0


class _Error(msgspec.Struct):
    type: str = ""
    code: int | str | None = None


class _Event(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: _Error | None = None


_event_decoder = msgspec.json.Decoder(_Event)


def request_body(spec: LoadSpec, index: int) -> bytes:
    # The leading index makes every prompt differ, so no stream rides another's prefix cache.
    prompt = f"{index} " + "the " * spec.prompt_words
    return msgspec.json.encode(
        {
            "model": spec.model,
            "messages": [{"role": "user", "content": prompt}],
            "stream": True,
            "max_tokens": spec.max_tokens,
            "ignore_eos": spec.ignore_eos,
            "stream_options": {"include_usage": True},
        }
    )


_NEW, _STREAMING, _CLOSED = 0, 1, 2  # a _Reader's state


class _Reader:
    """One stream's SSE lines, counted as they arrive (``http1.Response``'s ``on_line``,
    called from the connection's ``data_received``: no task wakes per line). From its
    first line to ``close`` the stream counts as streaming in ``counters[slot]``."""

    __slots__ = (
        "counters",
        "error",
        "first",
        "is_done",
        "last",
        "num_deltas",
        "num_tokens",
        "slot",
        "state",
    )

    def __init__(self, counters: Any, slot: int) -> None:
        self.first = self.last = math.nan
        self.num_deltas, self.num_tokens = 0, -1
        self.error, self.is_done = "", False
        self.counters, self.slot, self.state = counters, slot, _NEW

    def close(self) -> None:
        if self.state == _STREAMING:
            self.counters[self.slot] -= 1
        self.state = _CLOSED

    def line(self, line: bytes) -> None:
        if self.state == _NEW:
            self.state = _STREAMING
            self.counters[self.slot] += 1
        if self.is_done or not line.startswith(b"data: "):
            return
        data = line[6:]
        if data == b"[DONE]":
            self.is_done = True
            return
        event = _event_decoder.decode(data)
        if event.error is not None and not self.error:
            self.error = f"sse error {event.error.code} {event.error.type}"
        if any(c.delta and c.delta.content for c in event.choices):
            self.last = time.monotonic()
            if self.num_deltas == 0:
                self.first = self.last
            self.num_deltas += 1
        if event.usage is not None:
            self.num_tokens = event.usage.completion_tokens


async def _stream(
    client: http1.Client,
    request: bytes,
    spec: LoadSpec,
    start_at: float,
    counters: Any,
    slot: int,
    deadline: float,
) -> Row:
    """Run one streaming completion; never raises (except cancellation), returns its row."""
    loop = asyncio.get_running_loop()
    sent = time.monotonic()
    counters[slot] += 1
    reader = _Reader(counters, slot + 1)
    response = http1.Response(loop, reader.line)
    error = ""
    try:
        limit = min(spec.stream_timeout_s, deadline - sent)
        async with asyncio.timeout_at(loop.time() + limit) as within:
            await client.send(request, response)
        if response.status != 200:
            error = f"http {response.status}"
    except TimeoutError:
        error = "timeout" if within.expired() else "connect timeout"
    except (OSError, http1.ProtocolError, msgspec.DecodeError) as exc:
        errno = getattr(exc, "errno", None)
        error = type(exc).__name__ + (f" errno {errno}" if errno else "")
    finally:
        counters[slot] -= 1
        reader.close()
    error = error or reader.error
    if not error and not reader.is_done:
        error = "stream ended without [DONE]"
    first, last, num_deltas = reader.first, reader.last, reader.num_deltas
    tokens = reader.num_tokens if reader.num_tokens >= 0 else num_deltas
    tpot = (last - first) / (tokens - 1) if tokens > 1 and num_deltas > 1 else math.nan
    end = time.monotonic()
    return (sent - start_at, first - sent, end - start_at, tpot, tokens, error)


async def _client(
    proc_index: int, spec: LoadSpec, counters: Any, go: Any, start_at: Any, events: Any
) -> list[Row]:
    slot = 2 * proc_index
    local_addr = (f"127.0.0.{proc_index % 254 + 1}", 0) if spec.spread_sources else None
    client = http1.Client(spec.url, local_addr=local_addr, connect_timeout_s=30.0)
    try:
        events.put(("ready", proc_index))
        if not await asyncio.to_thread(go.wait, 300):
            raise TimeoutError("no start signal from the orchestrator in 300 s")
        t0: float = start_at.value
        deadline = t0 + spec.deadline_s
        step_s = spec.ramp_s / spec.num_streams
        tasks = []
        async with asyncio.TaskGroup() as tg:
            for index in range(proc_index, spec.num_streams, spec.num_procs):
                request = client.post_bytes("/v1/chat/completions", request_body(spec, index))
                delay = t0 + index * step_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                stream = _stream(client, request, spec, t0, counters, slot, deadline)
                tasks.append(tg.create_task(stream))
        return [task.result() for task in tasks]
    finally:
        client.close()


def client_main(
    proc_index: int, spec: LoadSpec, counters: Any, go: Any, start_at: Any, events: Any
) -> None:
    """Entry point of one client process: run its share of streams, send back its rows."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cpu_before = time.process_time()
    try:
        import uvloop
    except ImportError:
        run = asyncio.run
    else:
        run = uvloop.run
    rows = run(_client(proc_index, spec, counters, go, start_at, events))
    events.put(("done", proc_index, rows, time.process_time() - cpu_before))
