"""The floor under a Python frontend's CPU per output token: aiohttp doing only what any
OpenAI-compatible frontend must do for a streamed chat completion, and nothing of Baton's.

Each request is read and decoded (msgspec), its messages rendered by the chat template and
tokenized by Baton's builtin tokenizer (as Baton's frontend does, and as Dynamo's does in
Rust with the same ``tokenizers`` library), and answered with ``--max-tokens`` tokens as SSE
events of ``--tokens-per-event`` tokens each, one every ``--event-interval-ms`` (as tokens
come from a worker), then a usage event and ``[DONE]``. No bus, router, worker, admission,
detokenizer or metrics: whatever Baton's frontend costs above this is Baton's own.

The server runs in ``--procs`` processes on one port (``SO_REUSEPORT``, as ``baton up``
starts the frontend); ``bench/streams.py``'s client drives it (``--url``), and the servers'
CPU per output token comes from the same accounting as every other run there. Run from the
repository root::

    .venv/bin/python bench/frontend_floor.py --streams 1000,5000 --tokens-per-event 1,5 \\
        --json /tmp/frontend_floor.json
"""

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from shared.servers import free_port, wait_for_port
from shared.tokenizer.tokenizer import Tokenizer

HERE = Path(__file__).resolve().parent


class _Message(msgspec.Struct):
    role: str
    content: str


class _Request(msgspec.Struct):
    model: str
    messages: list[_Message]
    max_tokens: int = 16


_decoder = msgspec.json.Decoder(_Request)


def _event(
    request_id: str, content: str | None, finish: str | None, usage: dict[str, int] | None = None
) -> bytes:
    delta = {} if content is None else {"content": content}
    body: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "floor",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        body["usage"] = usage
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


def build_app(tokens_per_event: int, interval_s: float) -> web.Application:
    tokenizer = Tokenizer.load("builtin")
    counter = 0

    async def complete(request: web.Request) -> web.StreamResponse:
        nonlocal counter
        body = _decoder.decode(await request.read())
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        text = tokenizer.apply_chat_template(messages, True)
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
        counter += 1
        request_id = f"chatcmpl-{os.getpid()}-{counter}"
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        sent = 0
        while sent < body.max_tokens:
            await asyncio.sleep(interval_s)
            n = min(tokens_per_event, body.max_tokens - sent)
            await response.write(_event(request_id, " the" * n, None))
            sent += n
        usage = {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": sent,
            "total_tokens": len(prompt_ids) + sent,
        }
        await response.write(_event(request_id, None, "length", usage))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", complete)
    return app


def serve(port: int, tokens_per_event: int, interval_s: float) -> None:
    """One serving process (``--serve``): runs until SIGTERM."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    app = build_app(tokens_per_event, interval_s)
    web.run_app(
        app, host="127.0.0.1", port=port, reuse_port=True, backlog=4096, print=None, access_log=None
    )


@contextlib.contextmanager
def floor_servers(procs: int, tokens_per_event: int, interval_ms: float) -> Iterator[Any]:
    port = free_port()
    children = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve",
                str(port),
                "--tokens-per-event",
                str(tokens_per_event),
                "--event-interval-ms",
                str(interval_ms),
            ],
            cwd=HERE.parent,
        )
        for _ in range(procs)
    ]
    try:
        for child in children:  # one listening answers for all: also see that none exited
            wait_for_port(port, 60, child)
        time.sleep(1.0)  # every process listening, not only the first
        yield port, [c.pid for c in children]
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()


def run_one(args: argparse.Namespace, streams: int, tokens_per_event: int) -> dict[str, Any]:
    """One run of ``bench/streams.py``'s load against fresh floor servers; its results."""
    servers = floor_servers(args.procs, tokens_per_event, args.event_interval_ms)
    with servers as (port, pids), tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "streams.json"
        subprocess.run(
            [
                sys.executable,
                str(HERE / "streams.py"),
                "--url",
                f"http://127.0.0.1:{port}",
                "--server-pids",
                ",".join(map(str, pids)),
                "--streams",
                str(streams),
                "--max-tokens",
                str(args.max_tokens),
                "--prompt-tokens",
                str(args.prompt_tokens),
                "--json",
                str(out),
            ],
            cwd=HERE.parent,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        results: dict[str, Any] = json.loads(out.read_text())["results"]
    return results


def _table(rows: list[dict[str, Any]]) -> str:
    """Medians over the repeats, one line per stream count and event size."""
    keys = sorted({(r["streams"], r["tokens_per_event"]) for r in rows})
    lines = [
        f"{'streams':>8} {'tokens/event':>13} {'runs':>5} {'completed':>10} {'errors':>7} "
        f"{'us/token (runs)':>24} {'median':>7} {'TPOT p50 ms':>12}"
    ]
    for streams, tpe in keys:
        mine = [r for r in rows if (r["streams"], r["tokens_per_event"]) == (streams, tpe)]
        costs = [r["server_cpu_us_per_token"] for r in mine]
        lines.append(
            f"{streams:>8} {tpe:>13} {len(mine):>5} {sum(r['completed'] for r in mine):>10} "
            f"{sum(r['errors'] for r in mine):>7} {' '.join(f'{c:.1f}' for c in costs):>24} "
            f"{statistics.median(costs):>7.1f} "
            f"{statistics.median(r['tpot_p50_ms'] for r in mine):>12.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--streams", default="1000,5000", help="stream counts, comma-separated")
    p.add_argument("--tokens-per-event", default="1,5", help="comma-separated")
    p.add_argument("--event-interval-ms", type=float, default=2.0)
    p.add_argument("--procs", type=int, default=4, help="serving processes (baton up's here)")
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", default="", help="write the results here as JSON")
    args = p.parse_args()
    if args.serve:
        serve(args.serve, int(args.tokens_per_event), args.event_interval_ms / 1000)
        return
    rows = []
    for _ in range(args.repeats):
        for streams in [int(s) for s in args.streams.split(",")]:
            for tpe in [int(t) for t in args.tokens_per_event.split(",")]:
                r = run_one(args, streams, tpe)
                row = {
                    "streams": streams,
                    "tokens_per_event": tpe,
                    "completed": r["num_completed"],
                    "errors": r["num_errors"],
                    "short_streams": r["num_short_streams"],
                    "server_cpu_us_per_token": r["server_cpu_us_per_token"],
                    "client_cpu_s": r["client_cpu_s"],
                    "tpot_p50_ms": r["tpot_ms"]["p50"],
                }
                rows.append(row)
                print(
                    f"{streams:>6} streams  {tpe:>3} tokens/event  "
                    f"{row['completed']:>6} completed  {row['errors']} errors  "
                    f"{row['server_cpu_us_per_token']:6.1f} us/token server CPU  "
                    f"client {row['client_cpu_s']:.1f} s",
                    flush=True,
                )
    print(
        f"aiohttp floor: {args.procs} processes, {args.max_tokens} tokens a stream, ~"
        f"{args.prompt_tokens}-token prompts, an event every {args.event_interval_ms:g} ms"
    )
    print(_table(rows))
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "serve"}
        Path(args.json).write_text(json.dumps({"config": config, "rows": rows}, indent=2))
        print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
