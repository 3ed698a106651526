"""The client side of bench/streams.py: one process's share of streaming chat completions.

Each process runs one asyncio loop (uvloop where installed) with one aiohttp session, starts its
streams on the shared ramp schedule, keeps its open-stream counters in shared memory for the
orchestrator's sampler, and sends back one compact row per stream when all are done.
"""

import asyncio
import math
import resource
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

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


async def _stream(
    session: aiohttp.ClientSession,
    spec: LoadSpec,
    index: int,
    start_at: float,
    counters: Any,
    slot: int,
    deadline: float,
) -> Row:
    """Run one streaming completion; never raises (except cancellation), returns its row."""
    loop = asyncio.get_running_loop()
    body = request_body(spec, index)
    sent = time.monotonic()
    first = last = math.nan
    num_deltas, num_tokens, error, is_done = 0, -1, "", False
    counters[slot] += 1
    is_streaming = False
    try:
        limit = min(spec.stream_timeout_s, deadline - sent)
        async with (
            asyncio.timeout_at(loop.time() + limit),
            session.post(
                f"{spec.url}/v1/chat/completions",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as resp,
        ):
            if resp.status != 200:
                error = f"http {resp.status}"
                await resp.read()
            else:
                counters[slot + 1] += 1
                is_streaming = True
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:].rstrip()
                    if data == b"[DONE]":
                        is_done = True
                        break
                    event = _event_decoder.decode(data)
                    if event.error is not None and not error:
                        error = f"sse error {event.error.code} {event.error.type}"
                    if any(c.delta and c.delta.content for c in event.choices):
                        last = time.monotonic()
                        if num_deltas == 0:
                            first = last
                        num_deltas += 1
                    if event.usage is not None:
                        num_tokens = event.usage.completion_tokens
    except TimeoutError:
        error = "timeout"
    except (aiohttp.ClientError, OSError, ValueError, msgspec.DecodeError) as exc:
        errno = getattr(exc, "errno", None)
        error = type(exc).__name__ + (f" errno {errno}" if errno else "")
    finally:
        counters[slot] -= 1
        if is_streaming:
            counters[slot + 1] -= 1
    if not error and not is_done:
        error = "stream ended without [DONE]"
    tokens = num_tokens if num_tokens >= 0 else num_deltas
    tpot = (last - first) / (tokens - 1) if tokens > 1 and num_deltas > 1 else math.nan
    end = time.monotonic()
    return (sent - start_at, first - sent, end - start_at, tpot, tokens, error)


async def _client(
    proc_index: int, spec: LoadSpec, counters: Any, go: Any, start_at: Any, events: Any
) -> list[Row]:
    slot = 2 * proc_index
    local_addr = (f"127.0.0.{proc_index % 254 + 1}", 0) if spec.spread_sources else None
    connector = aiohttp.TCPConnector(limit=0, local_addr=local_addr)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        events.put(("ready", proc_index))
        if not await asyncio.to_thread(go.wait, 300):
            raise TimeoutError("no start signal from the orchestrator in 300 s")
        t0: float = start_at.value
        deadline = t0 + spec.deadline_s
        step_s = spec.ramp_s / spec.num_streams
        tasks = []
        async with asyncio.TaskGroup() as tg:
            for index in range(proc_index, spec.num_streams, spec.num_procs):
                delay = t0 + index * step_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(
                    tg.create_task(_stream(session, spec, index, t0, counters, slot, deadline))
                )
        return [task.result() for task in tasks]


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
