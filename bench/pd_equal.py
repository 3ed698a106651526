"""`baton up` aggregated, then with a prefill worker: the same greedy text, streamed by the
`openai` SDK from both, and the frontend's own count of remote prefills.

It runs the CLI users run (``baton up --engine E`` and ``baton up --engine E
--num-prefill-workers 1``, defaults otherwise, each on a free port with its own NATS and etcd),
streams a few chat completions long enough for the router's default threshold (2,048
uncached prompt tokens) to send them to the prefill worker, and prints per prompt whether
the texts match, the remote prefill count, and the TTFT phases the frontend measured
(queue, prefill, KV transfer, other; workers report them for remote prefills only, so the
aggregated run has none). Which prompts go remote is the router's default decision, which
also weighs the prefill worker's queue against the decode worker's.

    .venv-vllm/bin/python bench/pd_equal.py --engine vllm
    .venv/bin/python bench/pd_equal.py --engine torch --json /tmp/pd.json
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import openai

from services.bench.endpoint import parse_samples
from shared.servers import free_port

MODEL = "baton-sim"
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "box",
]


def prompt(i: int, num_words: int) -> str:
    """A long, distinct user message (about 1.3 tokens a word with the built-in tokenizer)."""
    return f"Document {i}: " + " ".join(
        WORDS[(i * 5 + j * 3) % len(WORDS)] for j in range(num_words)
    )


def start(engine: str, num_prefill: int, log_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [
        sys.executable, "-m", "services.launcher", "up",
        "--engine", engine,
        "--port", str(port),
        "--num-prefill-workers", str(num_prefill),
        "--log-dir", str(log_dir),
    ]  # fmt: skip
    log = (log_dir / "baton-up.log").open("wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    num_workers = 2 + num_prefill  # baton up's two decode workers and the prefill ones
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"baton up exited {proc.returncode}; see {log_dir}")
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=2) as resp:
                ready = json.loads(resp.read())
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as resp:
                models = [m["id"] for m in json.loads(resp.read())["data"]]
            if ready.get("workers", 0) >= num_workers and MODEL in models:
                return proc, url
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"baton up was not ready in 600 s; see {log_dir}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stream(url: str, text: str, max_tokens: int) -> tuple[str, int]:
    """The streamed text and the completion's token count."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    chunks = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": text}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    parts: list[str] = []
    num_tokens = 0
    for chunk in chunks:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            num_tokens = chunk.usage.completion_tokens
    return "".join(parts), num_tokens


def frontend_metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        lines = resp.read().decode().splitlines()
    names = ("baton_frontend_remote_prefills_total", "baton_frontend_ttft_phase_seconds_sum",
             "baton_frontend_ttft_phase_seconds_count")  # fmt: skip
    return parse_samples(lines, names)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", default="vllm", choices=["sim", "torch", "vllm"])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--words", type=int, default=1800, help="words per prompt (~1.3 tokens each)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--json", default="")
    args = p.parse_args()
    texts = [prompt(i, args.words) for i in range(args.prompts)]
    results: dict[str, object] = {"config": vars(args)}
    outputs: dict[str, list[str]] = {}
    for name, num_prefill in (("aggregated", 0), ("disaggregated", 1)):
        log_dir = Path(tempfile.mkdtemp(prefix=f"baton-pd-{name}-"))
        started = time.monotonic()
        proc, url = start(args.engine, num_prefill, log_dir)
        ready_s = time.monotonic() - started
        try:
            outputs[name] = []
            for text in texts:
                out, num_tokens = stream(url, text, args.max_tokens)
                if num_tokens != args.max_tokens:
                    raise RuntimeError(f"{name}: {num_tokens} tokens, {args.max_tokens} asked")
                outputs[name].append(out)
            samples = frontend_metrics(url)
        finally:
            stop(proc)
        phases = {}
        for phase in ("queue", "prefill", "transfer", "other"):
            key = f'phase="{phase}"'
            total = sum(v for k, v in samples.items() if key in k and "_sum" in k)
            count = sum(v for k, v in samples.items() if key in k and "_count" in k)
            phases[phase] = 1000 * total / count if count else float("nan")  # nan: none
        remote = sum(v for k, v in samples.items() if k.startswith("baton_frontend_remote"))
        results[name] = {"ready_s": ready_s, "remote_prefills": remote, "phase_ms": phases}
        print(
            f"{name:>13}: ready in {ready_s:.0f} s, {len(texts)} streams of {args.max_tokens} "
            f"tokens, remote prefills {remote:.0f}; TTFT phases (mean ms) "
            + ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
        )
    same = [a == b for a, b in zip(outputs["aggregated"], outputs["disaggregated"], strict=True)]
    results["identical"] = same
    print(f"greedy text identical, aggregated vs disaggregated: {sum(same)} of {len(same)}")
    print(f"first prompt's text: {outputs['disaggregated'][0][:120]!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if not all(same):
        sys.exit(1)


if __name__ == "__main__":
    main()
