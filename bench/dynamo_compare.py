"""Server CPU per output token, Baton against NVIDIA Dynamo, in one run with one load client.

For each stream count it starts Baton as ``baton up`` does (nats-server, etcd, the KV-aware
router, one decode worker running the sim engine at ``--speedup``, the frontend with as many
processes as ``baton up`` gives it), runs ``bench/streams.py``'s load against it and stops it;
then it starts Dynamo as an external program (nats-server and etcd as above, ``python -m
dynamo.mocker`` at ``--speedup-ratio`` and ``python -m dynamo.frontend``, from the
``--dynamo-python`` interpreter) and runs the identical load. Each measurement is repeated
``--repeats`` times, the order of the two systems alternating, and the table shows medians.

Both sides count the same kinds of server processes: the bus and discovery servers (NATS,
etcd), the engine worker, and the frontend (Baton's router is a process of its own; Dynamo's
runs inside its frontend). Both engines get the same capacity: ``--max-num-seqs`` as many as
the streams, KV cache of Baton's defaults (65,536 blocks of 16 tokens), 8,192 batched tokens.
Dynamo's model directory is a temporary one holding Baton's builtin tokenizer (and a small
Llama-shaped ``config.json`` that the mocker reads for its KV-size estimate), so prompts are the
same number of tokens on both.

Install Dynamo into its own virtual environment (its ``aisimulate`` dependency is not needed
by the frontend and mocker)::

    python3 -m venv /work/dynvenv
    /work/dynvenv/bin/pip install --no-deps ai-dynamo==1.6.1 ai-dynamo-runtime==1.6.1
    /work/dynvenv/bin/pip install <the other Requires-Dist lines of both packages>

Run it from the repository root (it imports its siblings ``streams.py`` and
``stream_client.py``)::

    .venv/bin/python bench/dynamo_compare.py --dynamo-python /work/dynvenv/bin/python \\
        --streams 1000,5000 --json /tmp/dynamo_compare.json

Without ``--dynamo-python`` (or when it cannot import ``dynamo``) only Baton is measured.
"""

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import streams
from stream_client import LoadSpec

from services.launcher.config import UpConfig
from services.launcher.threaded import cluster_in_thread
from shared.servers import free_port, local_servers
from shared.tokenizer.tokenizer import builtin_dir

SYSTEMS = ("baton", "dynamo")

# Baton's sim defaults (shared/engine/config.py), given to Dynamo's mocker too.
KV_BLOCKS, BLOCK_SIZE, MAX_BATCHED_TOKENS = 65536, 16, 8192

# A Llama-shaped config.json for the mocker's KV-bytes estimate; no weights are read.
MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "torch_dtype": "bfloat16",
}


# ---- the two systems ----------------------------------------------------------------------


@contextlib.contextmanager
def baton(args: argparse.Namespace, num_streams: int, log_dir: str) -> Iterator[streams.Servers]:
    """A cluster as ``baton up --num-workers 1 --speedup S`` starts it, on a free port."""
    up = UpConfig(
        port=0,
        num_workers=1,
        speedup=args.speedup,
        num_frontends=args.frontends,
        frontend_nice=args.frontend_nice,
        log_dir=log_dir,
        namespace=f"cmp{uuid.uuid4().hex[:6]}",
        ready_timeout_s=120.0,
    )
    spec = up.cluster_spec()
    env = {**spec.env, "BATON_DECODE_MAX_NUM_SEQS": str(num_streams)}
    with cluster_in_thread(replace(spec, env=env)) as cluster:
        yield streams.Servers(cluster.url, cluster.pids, cluster.frontend.pid)


def dynamo_version(python: str) -> str:
    """``ai-dynamo``'s version under ``python``; raises if it cannot import ``dynamo``."""
    code = (
        "import importlib.metadata as m, dynamo.frontend, dynamo.mocker; "
        "print(m.version('ai-dynamo'))"
    )
    done = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr else "failed")
    return done.stdout.strip()


def make_model_dir(root: str) -> str:
    """Baton's builtin tokenizer plus a config.json, as a Hugging Face model directory."""
    path = Path(root) / "model"
    path.mkdir(parents=True, exist_ok=True)
    source = builtin_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        file = source.joinpath(name)
        if file.is_file():
            (path / name).write_bytes(file.read_bytes())
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    added = {t["content"] for t in tokenizer.get("added_tokens", [])} - set(vocab)
    vocab_size = len(vocab) + len(added)
    config = {**MODEL_CONFIG, "vocab_size": vocab_size}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return str(path)


def _popen(command: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def _wait_model(
    url: str, model: str, procs: list[subprocess.Popen[bytes]], deadline_s: float
) -> None:
    """Until ``GET /v1/models`` lists ``model``; raises if a process exits first."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(map(str, proc.args))} exited with {proc.returncode}")
        with (
            contextlib.suppress(OSError, urllib.error.URLError, ValueError),
            urllib.request.urlopen(f"{url}/v1/models", timeout=5) as resp,
        ):
            if any(m.get("id") == model for m in json.load(resp).get("data", [])):
                return
        time.sleep(0.5)
    raise TimeoutError(f"Dynamo at {url} did not list {model} in {deadline_s} s")


@contextlib.contextmanager
def dynamo(args: argparse.Namespace, num_streams: int, log_dir: str) -> Iterator[streams.Servers]:
    """nats-server and etcd (as Baton starts them), Dynamo's mocker and its frontend."""
    model_dir = make_model_dir(log_dir)
    port = free_port()
    with local_servers(log_dir) as (nats, etcd):
        env = {
            **os.environ,
            "ETCD_ENDPOINTS": etcd.url,
            "NATS_SERVER": nats.url,
            "DYN_NAMESPACE": "dynamo",
        }
        mocker = [
            args.dynamo_python,
            "-m",
            "dynamo.mocker",
            "--model-path",
            model_dir,
            "--model-name",
            args.model,
            "--speedup-ratio",
            str(args.speedup),
            "--max-num-seqs",
            str(num_streams),
            "--num-gpu-blocks-override",
            str(KV_BLOCKS),
            "--block-size",
            str(BLOCK_SIZE),
            "--max-num-batched-tokens",
            str(MAX_BATCHED_TOKENS),
        ]
        frontend = [
            args.dynamo_python,
            "-m",
            "dynamo.frontend",
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(port),
            "--router-mode",
            args.dynamo_router_mode,
            "--kv-cache-block-size",
            str(BLOCK_SIZE),
        ]
        procs: list[subprocess.Popen[bytes]] = []
        try:
            procs.append(_popen(mocker, env, os.path.join(log_dir, "dynamo-mocker.log")))
            procs.append(_popen(frontend, env, os.path.join(log_dir, "dynamo-frontend.log")))
            url = f"http://127.0.0.1:{port}"
            _wait_model(url, args.model, procs, 180.0)
            pids = [nats.proc.pid, etcd.proc.pid, procs[0].pid, procs[1].pid]
            yield streams.Servers(url, pids, procs[1].pid)
        finally:
            for proc in reversed(procs):
                _stop(proc)


# ---- measurement and report ---------------------------------------------------------------


def measure(
    args: argparse.Namespace,
    system: str,
    num_streams: int,
    repeat: int,
) -> dict[str, Any]:
    log_dir = tempfile.mkdtemp(
        prefix=f"cmp-{system}-{num_streams}-{repeat}-", dir=args.log_dir or None
    )
    start: Callable[..., contextlib.AbstractContextManager[streams.Servers]] = (
        baton if system == "baton" else dynamo
    )
    with start(args, num_streams, log_dir) as servers:
        spec = LoadSpec(
            url=servers.url,
            model=args.model if system == "dynamo" else "baton-sim",
            num_streams=num_streams,
            num_procs=min(args.client_procs or math.ceil(num_streams / 5000), num_streams),
            max_tokens=args.max_tokens,
            prompt_words=max(1, args.prompt_tokens - 12),
            ignore_eos=True,
            ramp_s=args.ramp_s if args.ramp_s >= 0 else num_streams / 2000,
            stream_timeout_s=args.stream_timeout_s,
            deadline_s=args.deadline_s,
            spread_sources=True,
        )
        result = streams.run_load(spec, servers)
    result["log_dir"] = log_dir
    result["load"] = asdict(spec)
    return result


def _median(values: list[float]) -> float:
    values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else math.nan


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats of one system at one stream count."""
    labels = sorted({k for r in runs for k in r["server_cpu_s_by_process"]})
    tokens = [r["num_output_tokens"] for r in runs]
    return {
        "num_runs": len(runs),
        "num_completed": _median([r["num_completed"] for r in runs]),
        "num_errors": _median([r["num_errors"] for r in runs]),
        "errors": [r["errors"] for r in runs],
        "server_cpu_us_per_token": _median([r["server_cpu_us_per_token"] for r in runs]),
        "server_cpu_us_per_token_runs": [r["server_cpu_us_per_token"] for r in runs],
        "server_cpu_us_per_token_by_process": {
            label: _median(
                [
                    r["server_cpu_s_by_process"].get(label, 0.0) * 1e6 / n if n else math.nan
                    for r, n in zip(runs, tokens, strict=True)
                ]
            )
            for label in labels
        },
        "client_cpu_us_per_token": _median(
            [
                r["client_cpu_s"] * 1e6 / n if n else math.nan
                for r, n in zip(runs, tokens, strict=True)
            ]
        ),
        "client_cpu_s": _median([r["client_cpu_s"] for r in runs]),
        "ttft_ms": {p: _median([r["ttft_ms"][p] for r in runs]) for p in ("p50", "p99")},
        "tpot_ms": {p: _median([r["tpot_ms"][p] for r in runs]) for p in ("p50", "p99")},
        "output_tokens_per_s": _median([r["output_tokens_per_s"] for r in runs]),
        "peak_open_streams": _median([r["peak_open_streams"] for r in runs]),
        "frontend_kb_per_stream": _median([r["frontend_kb_per_stream"] for r in runs]),
        "frontend_rss_before_mib": _median([r["frontend_rss_before_mib"] for r in runs]),
    }


def _fmt(value: float, spec: str) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (format(value, spec))
    )


def cpu_ratio(by_system: dict[str, Any]) -> float:
    """Baton's server CPU per token over Dynamo's (medians)."""
    dynamo_us = by_system["dynamo"]["server_cpu_us_per_token"]
    return by_system["baton"]["server_cpu_us_per_token"] / dynamo_us if dynamo_us else math.nan


def format_table(args: argparse.Namespace, summary: dict[int, dict[str, Any]]) -> str:
    header = (
        f"Baton vs Dynamo {args.dynamo_version or '(not run)'}: one engine worker each (Baton sim"
        f" --speedup {args.speedup:g}, Dynamo mocker --speedup-ratio {args.speedup:g}), "
        f"~{args.prompt_tokens}-token prompts, {args.max_tokens} output tokens; "
        f"median of {args.repeats} runs each"
    )
    columns = [(n, s) for n, by_system in summary.items() for s in SYSTEMS if s in by_system]
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("completed / errors", lambda r: f"{r['num_completed']:g} / {r['num_errors']:g}"),
        (
            "server CPU us/token",
            lambda r: (
                " ".join(_fmt(v, ".1f") for v in r["server_cpu_us_per_token_runs"])
                + f" -> {_fmt(r['server_cpu_us_per_token'], '.1f')}"
            ),
        ),
    ]
    labels = sorted(
        {
            k
            for by_system in summary.values()
            for r in by_system.values()
            for k in r["server_cpu_us_per_token_by_process"]
        }
    )
    for label in labels:
        rows.append(
            (
                f"  {label}",
                lambda r, label=label: _fmt(
                    r["server_cpu_us_per_token_by_process"].get(label, math.nan), ".1f"
                ),
            )
        )
    rows += [
        ("client CPU us/token", lambda r: _fmt(r["client_cpu_us_per_token"], ".1f")),
        (
            "TTFT p50 / p99 ms",
            lambda r: f"{_fmt(r['ttft_ms']['p50'], '.0f')} / {_fmt(r['ttft_ms']['p99'], '.0f')}",
        ),
        (
            "TPOT p50 / p99 ms",
            lambda r: f"{_fmt(r['tpot_ms']['p50'], '.1f')} / {_fmt(r['tpot_ms']['p99'], '.1f')}",
        ),
        ("output tokens/s", lambda r: _fmt(r["output_tokens_per_s"], ".0f")),
        ("peak open streams", lambda r: _fmt(r["peak_open_streams"], ".0f")),
        ("frontend KB/stream", lambda r: _fmt(r["frontend_kb_per_stream"], ".1f")),
        ("frontend RSS idle MiB", lambda r: _fmt(r["frontend_rss_before_mib"], ".0f")),
    ]
    width = max([22, *(len(f"{s} @ {n}") + 2 for n, s in columns)])
    lines = [header, f"{'':<24}" + "".join(f"{f'{s} @ {n}':>{width}}" for n, s in columns)]
    for name, cell in rows:
        lines.append(f"{name:<24}" + "".join(f"{cell(summary[n][s]):>{width}}" for n, s in columns))
    for n, by_system in summary.items():
        if len(by_system) == 2:
            ratio = cpu_ratio(by_system)
            lines.append(f"Baton / Dynamo server CPU per token at {n} streams: {ratio:.2f}x")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--streams", default="1000,5000", help="stream counts, comma-separated")
    p.add_argument("--repeats", type=int, default=2, help="runs per system and stream count")
    p.add_argument("--dynamo-python", default="", help="Python with ai-dynamo installed")
    p.add_argument(
        "--dynamo-router-mode",
        default="kv",
        help="Dynamo frontend's --router-mode (kv: as Baton's KV-aware router)",
    )
    p.add_argument("--systems", default="baton,dynamo", help="which systems to measure")
    p.add_argument("--speedup", type=float, default=1000.0, help="engine time divisor, both")
    p.add_argument("--frontends", type=int, default=0, help="Baton: 0 as baton up chooses")
    p.add_argument(
        "--frontend-nice", type=int, default=UpConfig().frontend_nice, help="Baton: as baton up"
    )
    p.add_argument("--model", default="dynamo-sim", help="Dynamo's served model name")
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--prompt-tokens", type=int, default=200, help="approximate prompt length")
    p.add_argument(
        "--client-procs", type=int, default=0, help="client processes (0: one per 5000 streams)"
    )
    p.add_argument("--ramp-s", type=float, default=-1.0, help="-1: streams / 2000")
    p.add_argument("--stream-timeout-s", type=float, default=300.0)
    p.add_argument("--deadline-s", type=float, default=600.0, help="one run's deadline")
    p.add_argument("--log-dir", default="", help="parent of the runs' log dirs (default: /tmp)")
    p.add_argument("--json", default="", help="write the results here as JSON")
    args = p.parse_args(argv)
    args.stream_counts = [int(s) for s in args.streams.split(",") if s.strip()]
    args.system_list = [s for s in args.systems.split(",") if s.strip()]
    if not args.stream_counts or min(args.stream_counts) < 1 or args.repeats < 1:
        p.error("--streams must list counts >= 1 and --repeats must be >= 1")
    if set(args.system_list) - set(SYSTEMS):
        p.error(f"--systems: choose from {', '.join(SYSTEMS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.dynamo_version = ""
    systems = list(args.system_list)
    if "dynamo" in systems:
        if not args.dynamo_python:
            print("Dynamo skipped: no --dynamo-python given", flush=True)
            systems.remove("dynamo")
        else:
            try:
                args.dynamo_version = dynamo_version(args.dynamo_python)
            except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"Dynamo skipped: {args.dynamo_python} cannot run it ({exc})", flush=True)
                systems.remove("dynamo")
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for num_streams in args.stream_counts:
        runs[num_streams] = {s: [] for s in systems}
        for repeat in range(args.repeats):
            order = systems if repeat % 2 == 0 else systems[::-1]
            for system in order:
                result = measure(args, system, num_streams, repeat)
                runs[num_streams][system].append(result)
                by_process = ", ".join(
                    f"{k} {v:.1f} s" for k, v in sorted(result["server_cpu_s_by_process"].items())
                )
                print(
                    f"{system} @ {num_streams} streams, run {repeat + 1}: "
                    f"{result['num_completed']} completed, {result['num_errors']} errors "
                    f"{result['errors'] or ''}, "
                    f"{result['server_cpu_us_per_token']:.1f} us/token server CPU ({by_process}), "
                    f"client {result['client_cpu_s']:.1f} s; logs {result['log_dir']}",
                    flush=True,
                )
    summary = {n: {s: summarize(rs) for s, rs in by.items()} for n, by in runs.items()}
    print(format_table(args, summary))
    if args.json:
        report = {
            "config": dict(vars(args)),
            "machine": {
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "summary": {str(n): by for n, by in summary.items()},
            "runs": {str(n): by for n, by in runs.items()},
        }
        Path(args.json).write_text(json.dumps(_nan_to_none(report), indent=2) + "\n")
        print(f"JSON: {args.json}")


def _nan_to_none(value: Any) -> Any:
    """JSON has no NaN: unmeasured numbers are written as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


if __name__ == "__main__":
    main()
