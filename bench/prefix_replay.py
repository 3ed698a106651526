"""The client side of bench/prefix_cluster.py: the Mooncake trace as token-id prompts, replayed
open-loop as streaming text completions.

Mapping. Each ``hash_id`` of the trace (one per 512-token block; equal ids are a shared prefix)
becomes ``block_tokens`` token ids derived from the id alone (SplitMix64 of the id, then of the
position, mod 6,000, plus 10), so equal ids give equal blocks and the engines' chained block
hashes see the trace's sharing. A prompt is its ids' blocks concatenated and cut to the
request's ``input_length`` scaled by ``block_tokens / 512`` (the last block is partial, as in
the trace). Each request asks for ``max(1, output_length // output_divisor)`` tokens with
``ignore_eos``.

Replay. Request ``i`` is due at ``t0 + timestamp_i / time_scale`` and is sent then, whatever
the earlier ones are doing (open loop), unless ``max_in_flight`` are open: then it waits for a
slot, and that wait counts in its TTFT (measured from when it was due, not when it was sent).
TTFT ends at the first ``data:`` line of the stream: the frontend answers 200 only once the
first token exists, and writes it at once. Only the final usage event is decoded as JSON.
"""

import asyncio
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec

from shared.engine.sim import splitmix64

TRACE = Path("/work/shared/traces/mooncake_conversation_trace.jsonl")
TRACE_BLOCK_TOKENS = 512
MIN_TOKEN_ID = 10
NUM_TOKEN_IDS = 6000
_GAMMA = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_s: float  # trace time since the first request, before time scaling
    token_ids: list[int]
    max_tokens: int
    num_trace_blocks: int


@dataclass(slots=True)
class Outcome:
    """One request as the client saw it; times in seconds since the replay's t0."""

    due_s: float
    send_lag_s: float = 0.0  # sent this long after it was due (a full client, a slow loop)
    ttft_s: float = math.nan  # from due to the first data line
    end_s: float = math.nan
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    error: str = ""


class _Details(msgspec.Struct):
    cached_tokens: int = 0


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: _Details | None = None


class _UsageEvent(msgspec.Struct):
    usage: _Usage | None = None


class _ErrorBody(msgspec.Struct):
    type: str = ""
    code: int | str | None = None


class _ErrorEvent(msgspec.Struct):
    error: _ErrorBody | None = None


_usage_decoder = msgspec.json.Decoder(_UsageEvent)
_error_decoder = msgspec.json.Decoder(_ErrorEvent)


def block_token_ids(hash_id: int, block_tokens: int) -> list[int]:
    """The tokens of one trace block: a pure function of its id."""
    seed = splitmix64(hash_id)
    return [
        splitmix64((seed + i * _GAMMA) & _MASK64) % NUM_TOKEN_IDS + MIN_TOKEN_ID
        for i in range(block_tokens)
    ]


def load_trace(
    path: Path, num_requests: int, block_tokens: int, output_divisor: int
) -> list[TraceRequest]:
    """The first ``num_requests`` rows as prompts of token ids (see the module docstring)."""
    blocks: dict[int, list[int]] = {}
    requests: list[TraceRequest] = []
    first_ms: float | None = None
    with path.open() as f:
        for line in f:
            if len(requests) >= num_requests:
                break
            row = json.loads(line)
            first_ms = row["timestamp"] if first_ms is None else first_ms
            token_ids: list[int] = []
            for hash_id in row["hash_ids"]:
                block = blocks.get(hash_id)
                if block is None:
                    block = blocks[hash_id] = block_token_ids(hash_id, block_tokens)
                token_ids.extend(block)
            num_tokens = max(1, math.ceil(row["input_length"] * block_tokens / TRACE_BLOCK_TOKENS))
            requests.append(
                TraceRequest(
                    arrival_s=(row["timestamp"] - first_ms) / 1000,
                    token_ids=token_ids[:num_tokens],
                    max_tokens=max(1, row["output_length"] // output_divisor),
                    num_trace_blocks=len(row["hash_ids"]),
                )
            )
    return requests


def request_body(model: str, request: TraceRequest) -> bytes:
    return msgspec.json.encode(
        {
            "model": model,
            "prompt": request.token_ids,
            "max_tokens": request.max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )


async def _read_stream(resp: aiohttp.ClientResponse, outcome: Outcome, t0: float) -> None:
    """Follow one SSE stream: TTFT at the first data line, usage from the last event."""
    is_done = False
    async for line in resp.content:
        if not line.startswith(b"data: "):
            continue
        if math.isnan(outcome.ttft_s):
            outcome.ttft_s = time.monotonic() - t0 - outcome.due_s
        if line.startswith(b"data: [DONE]"):
            is_done = True
            break
        if line.startswith(b'data: {"error"'):
            error = _error_decoder.decode(line[6:]).error
            outcome.error = outcome.error or f"sse error {error.code if error else '?'}"
        elif b'"prompt_tokens_details"' in line:
            usage = _usage_decoder.decode(line[6:]).usage
            if usage is not None:
                outcome.num_prompt_tokens = usage.prompt_tokens
                outcome.num_output_tokens = usage.completion_tokens
                details = usage.prompt_tokens_details
                outcome.num_cached_tokens = details.cached_tokens if details else 0
    if not is_done and not outcome.error:
        outcome.error = "stream ended without [DONE]"


async def _send(
    session: aiohttp.ClientSession, url: str, body: bytes, outcome: Outcome, t0: float
) -> None:
    """Run one request to completion; never raises except on cancellation."""
    try:
        async with session.post(
            url, data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            if resp.status != 200:
                outcome.error = f"http {resp.status}"
                await resp.read()
            else:
                await _read_stream(resp, outcome, t0)
    except TimeoutError:
        outcome.error = "timeout"
    except (aiohttp.ClientError, OSError, msgspec.DecodeError) as exc:
        outcome.error = type(exc).__name__
    finally:
        outcome.end_s = time.monotonic() - t0
    if outcome.error:
        outcome.ttft_s = math.nan


async def replay(
    base_url: str,
    model: str,
    requests: list[TraceRequest],
    *,
    time_scale: float,
    max_in_flight: int,
    request_timeout_s: float,
) -> list[Outcome]:
    """Send every request at its scaled arrival time; returns one outcome per request."""
    bodies = [request_body(model, r) for r in requests]
    url = f"{base_url}/v1/completions"
    slots = asyncio.Semaphore(max_in_flight)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=30)
    outcomes = [Outcome(due_s=r.arrival_s / time_scale) for r in requests]

    async def one(body: bytes, outcome: Outcome) -> None:
        try:
            await _send(session, url, body, outcome, t0)
        finally:
            slots.release()

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.monotonic() + 0.2
        async with asyncio.TaskGroup() as tg:
            for body, outcome in zip(bodies, outcomes, strict=True):
                delay = t0 + outcome.due_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await slots.acquire()
                outcome.send_lag_s = time.monotonic() - t0 - outcome.due_s
                tg.create_task(one(body, outcome))
    return outcomes
