"""What to send and when (pure): synthetic prompts, Azure and Mooncake traces, priorities.

A request is planned as a ``RequestPlan`` (due time, lengths, shared blocks, priority); its
token ids are built only when it is sent (``prompt_token_ids``), from the seed and the plan
alone, so plans are small to ship to client processes and every run with a seed sends the
same prompts. Token ids lie in [10, 6000), valid for any vocabulary Baton serves.

Prefix sharing. A Mooncake ``hash_id`` stands for one 512-token block; equal ids are equal
blocks. Each id becomes ``block_tokens`` ids that depend on the seed and the id only (512
scaled by ``--length-scale``), so the server's prefix cache sees the trace's sharing.
"""

import csv
import functools
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import msgspec

MIN_TOKEN_ID = 10
MAX_TOKEN_ID = 6000  # exclusive
_TOKEN_IDS = range(MIN_TOKEN_ID, MAX_TOKEN_ID)
MOONCAKE_BLOCK_TOKENS = 512
TRACE_FORMATS = ("auto", "azure", "mooncake")
PRIORITIES = {"high": -1, "normal": 0, "low": 1}  # vLLM: lower is served first
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One trace request; ``arrival_s`` counts from the trace's first request."""

    arrival_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    hash_ids: tuple[int, ...] = ()
    block_tokens: int = MOONCAKE_BLOCK_TOKENS


@dataclass(frozen=True, slots=True)
class RequestPlan:
    """One request to send: when, how long, which shared blocks, which priority."""

    index: int
    due_s: float
    stage: int
    num_prompt_tokens: int
    num_output_tokens: int
    num_prefix_tokens: int = 0  # the run's shared synthetic prefix opens the prompt
    hash_ids: tuple[int, ...] = ()  # then these shared blocks (trace replay)
    block_tokens: int = 0
    priority: int | None = None


class _MooncakeRow(msgspec.Struct, frozen=True):
    timestamp: float
    input_length: int
    output_length: int
    hash_ids: list[int] = []


_mooncake_decoder = msgspec.json.Decoder(_MooncakeRow)


def parse_priority_mix(text: str) -> dict[int, float]:
    """``"high=0.1,low=0.2"`` -> ``{-1: 0.1, 1: 0.2}``; the rest send no priority."""
    mix: dict[int, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, _, fraction_text = part.partition("=")
        name = name.strip().lower()
        if name not in PRIORITIES:
            raise ValueError(f"priority_mix: expected one of {list(PRIORITIES)}, got {name!r}")
        try:
            fraction = float(fraction_text)
        except ValueError:
            raise ValueError(f"priority_mix: expected NAME=FRACTION, got {part!r}") from None
        if not 0 <= fraction <= 1:
            raise ValueError(f"priority_mix: fraction must be in [0, 1], got {part!r}")
        mix[PRIORITIES[name]] = fraction
    if sum(mix.values()) > 1 + 1e-9:
        raise ValueError(f"priority_mix: fractions add up to {sum(mix.values()):g} > 1")
    return mix


def choose_priority(mix: dict[int, float], rng: random.Random) -> int | None:
    draw = rng.random()
    for priority, fraction in mix.items():
        if draw < fraction:
            return priority
        draw -= fraction
    return None


def parse_azure_timestamp(text: str) -> float:
    """``2023-11-16 18:17:03.9799600`` (UTC, up to 7 fractional digits) -> epoch seconds."""
    whole, _, fraction = text.strip().partition(".")
    base = datetime.fromisoformat(whole).replace(tzinfo=UTC).timestamp()
    return base + (float("0." + fraction) if fraction else 0.0)


def read_azure(lines: Iterable[str]) -> list[TraceRow]:
    """Azure LLM inference trace 2023 rows (``TIMESTAMP,ContextTokens,GeneratedTokens``)."""
    reader = csv.DictReader(lines)
    if reader.fieldnames is None or not set(AZURE_COLUMNS) <= set(reader.fieldnames):
        raise ValueError(f"azure trace: expected columns {AZURE_COLUMNS}, got {reader.fieldnames}")
    raw = [
        (
            parse_azure_timestamp(row["TIMESTAMP"]),
            int(row["ContextTokens"]),
            int(row["GeneratedTokens"]),
        )
        for row in reader
    ]
    raw.sort(key=lambda r: r[0])
    first = raw[0][0] if raw else 0.0
    return [TraceRow(t - first, n_in, n_out) for t, n_in, n_out in raw]


def read_mooncake(lines: Iterable[str]) -> list[TraceRow]:
    """Mooncake trace rows (``timestamp`` ms, ``input_length``, ``output_length``,
    ``hash_ids``), one JSON object per line."""
    raw: list[_MooncakeRow] = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                raw.append(_mooncake_decoder.decode(line))
            except msgspec.DecodeError as exc:
                raise ValueError(f"mooncake trace line {number}: {exc}") from exc
    raw.sort(key=lambda r: r.timestamp)
    first = raw[0].timestamp if raw else 0.0
    return [
        TraceRow((r.timestamp - first) / 1000, r.input_length, r.output_length, tuple(r.hash_ids))
        for r in raw
    ]


def trace_format_of(path: str, trace_format: str) -> str:
    if trace_format != "auto":
        return trace_format
    if path.endswith(".csv"):
        return "azure"
    if path.endswith((".jsonl", ".json")):
        return "mooncake"
    raise ValueError(f"cannot tell the format of {path!r}: pass --trace-format azure|mooncake")


def load_trace(path: str, trace_format: str = "auto") -> list[TraceRow]:
    """Read a trace file (the one I/O in this module)."""
    with Path(path).open(newline="") as f:
        if trace_format_of(path, trace_format) == "azure":
            return read_azure(f)
        return read_mooncake(f)


def window(rows: list[TraceRow], start_s: float, duration_s: float) -> list[TraceRow]:
    """Rows due in ``[start_s, start_s + duration_s)`` (0: to the end), re-based to 0."""
    end_s = start_s + duration_s if duration_s > 0 else math.inf
    return [
        replace(r, arrival_s=r.arrival_s - start_s) for r in rows if start_s <= r.arrival_s < end_s
    ]


def scale(
    rows: list[TraceRow],
    *,
    time_scale: float,
    length_scale: float,
    max_prompt_tokens: int,
    max_output_tokens: int,
) -> list[TraceRow]:
    """Compress time by ``time_scale`` and lengths by ``length_scale``, then clamp lengths to
    [1, max]. Blocks shrink with the lengths, so a scaled prompt keeps its shared prefix."""
    block_tokens = max(1, round(MOONCAKE_BLOCK_TOKENS * length_scale))
    return [
        TraceRow(
            r.arrival_s / time_scale,
            min(max_prompt_tokens, max(1, round(r.num_prompt_tokens * length_scale))),
            min(max_output_tokens, max(1, round(r.num_output_tokens * length_scale))),
            r.hash_ids,
            block_tokens,
        )
        for r in rows
    ]


def plan_trace(
    rows: list[TraceRow], priority_mix: dict[int, float], seed: int
) -> list[RequestPlan]:
    """One plan per (scaled) trace row, all in stage 0."""
    rng = random.Random(f"{seed}/priority")
    return [
        RequestPlan(
            index=i,
            due_s=r.arrival_s,
            stage=0,
            num_prompt_tokens=r.num_prompt_tokens,
            num_output_tokens=r.num_output_tokens,
            hash_ids=r.hash_ids,
            block_tokens=r.block_tokens if r.hash_ids else 0,
            priority=choose_priority(priority_mix, rng),
        )
        for i, r in enumerate(rows)
    ]


def plan_synthetic(
    due_s: list[float],
    stages: list[int],
    *,
    prompt_tokens: int,
    output_tokens: int,
    prefix_tokens: int,
    priority_mix: dict[int, float],
    seed: int,
) -> list[RequestPlan]:
    """One plan per arrival: ``prefix_tokens`` shared ids, then ``prompt_tokens`` random ones."""
    rng = random.Random(f"{seed}/priority")
    return [
        RequestPlan(
            index=i,
            due_s=t,
            stage=stage,
            num_prompt_tokens=prefix_tokens + prompt_tokens,
            num_output_tokens=output_tokens,
            num_prefix_tokens=prefix_tokens,
            priority=choose_priority(priority_mix, rng),
        )
        for i, (t, stage) in enumerate(zip(due_s, stages, strict=True))
    ]


@functools.lru_cache(maxsize=4096)
def block_token_ids(seed: int, block_id: int, num_tokens: int) -> tuple[int, ...]:
    """The ids of one shared block: a function of the seed and the block's id only."""
    return tuple(random.Random(f"{seed}/block/{block_id}").choices(_TOKEN_IDS, k=num_tokens))


def prompt_token_ids(plan: RequestPlan, seed: int) -> list[int]:
    """A plan's prompt: the shared prefix, its shared blocks, then ids of its own."""
    ids: list[int] = []
    if plan.num_prefix_tokens:
        ids.extend(block_token_ids(seed, -1, plan.num_prefix_tokens))
    for block_id in plan.hash_ids:
        if len(ids) >= plan.num_prompt_tokens:
            break
        ids.extend(block_token_ids(seed, block_id, plan.block_tokens))
    missing = plan.num_prompt_tokens - len(ids)
    if missing > 0:
        ids.extend(random.Random(f"{seed}/request/{plan.index}").choices(_TOKEN_IDS, k=missing))
    return ids[: plan.num_prompt_tokens]
