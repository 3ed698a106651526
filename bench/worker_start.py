"""Worker start benchmark: how long a decode worker takes from being started to serving.

For each engine (``--engines``) and each way of starting one (``--modes``) it starts a decode
worker ``--repeats`` times, one at a time, against a nats-server and an etcd of its own, and
times from the start:

- ``registered_s``: its entry is in etcd (the namespace's worker directory, matched by pid);
- ``ready_s``: its ``/ready`` answers 200 (registered, connected, and the engine served a
  one-token canary);
- ``first_token_s``: a one-token request sent to its inbox has streamed its token back.

Modes:

- ``cold``: spawn ``python -m services.worker --role decode ...`` (what a scale-up cost before
  standbys, and what a supervised restart still costs);
- ``standby``: spawn a standby as ``baton up --planner`` keeps one
  (``services/launcher/standby.py``), wait until it is warm, then start the clock and hand it
  over: what a scale-up waits for once the launcher has the planner's command. ``warm_s`` is
  how long the standby took to get warm (what replacing a used one costs, off the clock).

The torch engine is the small random model the e2e tests use (``--torch-args``), on CPU.
The machine is shared and noisy: read the medians.

    .venv/bin/python bench/worker_start.py --repeats 10 --json /tmp/worker_start.json
    .venv/bin/python bench/worker_start.py --engines torch --modes cold --repeats 5
"""

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import aiohttp
from nats.aio.msg import Msg

from proto import subjects
from proto.messages import ErrorReply, GenerateRequest, RequestId, SamplingParams, WorkerInfo
from services.launcher.standby import StandbyWorker, worker_command
from shared.bus import Bus
from shared.codec import generate_reply_decoder, token_batch_decoder
from shared.discovery import Discovery
from shared.discovery.watch import WorkerDirectory
from shared.servers import local_servers

ENGINE_ARGS = {
    "sim": ("--engine", "sim"),
    "torch": ("--engine", "torch", "--num-kv-blocks", "1024", "--max-model-len", "4096"),
}
METRICS = ("registered_s", "ready_s", "first_token_s")
_POLL_S = 0.005


class Timer:
    """Seconds since ``start()``."""

    def __init__(self) -> None:
        self._start_s = time.monotonic()

    def start(self) -> None:
        self._start_s = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self._start_s


class FirstTokens:
    """The bench's token inbox: which requests have had a token."""

    def __init__(self, bus: Bus, namespace: str) -> None:
        self.bus = bus
        self.subject = subjects.stream_inbox(namespace, f"bench{uuid.uuid4().hex[:6]}")
        self._events: dict[str, asyncio.Event] = {}

    async def start(self) -> None:
        await self.bus.subscribe(self.subject, self._on_batch)

    async def _on_batch(self, msg: Msg) -> None:
        for chunk in token_batch_decoder.decode(msg.data).chunks:
            if chunk.token_ids:
                self.event(chunk.request_id).set()

    def event(self, request_id: str) -> asyncio.Event:
        return self._events.setdefault(request_id, asyncio.Event())

    async def first_token(self, info: WorkerInfo) -> None:
        """Send a one-token request to the worker; return once its token is here."""
        request_id = RequestId(f"bench-{uuid.uuid4().hex[:8]}")
        request = GenerateRequest(
            request_id=request_id,
            model=info.model,
            token_ids=[11, 12, 13, 14],
            sampling=SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
            stream_subject=self.subject,
        )
        reply = generate_reply_decoder.decode(
            await self.bus.request(info.subject, request, timeout_s=30.0)
        )
        if isinstance(reply, ErrorReply):
            raise RuntimeError(f"worker refused the request: {reply}")
        await self.event(request_id).wait()


def _registered(directory: WorkerDirectory, pid: int) -> WorkerInfo | None:
    return next((i for i in directory.workers.values() if i.pid == pid), None)


async def _registered_or_exited(
    directory: WorkerDirectory, proc: asyncio.subprocess.Process, log: str
) -> None:
    """Return once the worker at ``proc`` is registered; raise if it exits first."""
    registered = asyncio.ensure_future(
        directory.wait_for(lambda: _registered(directory, proc.pid) is not None)
    )
    exited = asyncio.ensure_future(proc.wait())
    try:
        await asyncio.wait([registered, exited], return_when=asyncio.FIRST_COMPLETED)
    finally:
        registered.cancel()
        exited.cancel()
    if not registered.done() or registered.cancelled():
        raise RuntimeError(f"worker exited with code {proc.returncode} first; see {log}")


async def _wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    while True:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with session.get(f"{url}/ready") as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(_POLL_S)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(30):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()


class Bench:
    def __init__(self, args: argparse.Namespace, nats_url: str, etcd_url: str) -> None:
        self.args = args
        self.namespace = f"wstart{uuid.uuid4().hex[:6]}"
        self.env = {
            **os.environ,
            "BATON_NAMESPACE": self.namespace,
            "BATON_NATS_URL": nats_url,
            "BATON_ETCD_URL": etcd_url,
            "BATON_LOG_LEVEL": "info",
        }
        self.nats_url = nats_url
        self.etcd_url = etcd_url
        self.log_dir = args.log_dir or tempfile.mkdtemp(prefix="baton-worker-start-")
        self._num_starts = 0

    def _log(self, name: str) -> IO[bytes]:
        return open(os.path.join(self.log_dir, f"{name}.log"), "ab")

    async def _exec(
        self, name: str, command: tuple[str, ...], stdin: socket.socket | None = None
    ) -> asyncio.subprocess.Process:
        with self._log(name) as out:
            return await asyncio.create_subprocess_exec(
                *command,
                env=self.env,
                stdin=stdin.fileno() if stdin else None,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )

    async def run(self) -> dict[str, Any]:
        results: dict[str, Any] = {}
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with (
            Bus.connect(self.nats_url, name="bench") as bus,
            Discovery.connect(self.etcd_url) as discovery,
            discovery.watch_workers(self.namespace) as directory,
            aiohttp.ClientSession(timeout=timeout) as session,
        ):
            tokens = FirstTokens(bus, self.namespace)
            await tokens.start()
            for engine in self.args.engines.split(","):
                worker_args = ("--role", "decode", *ENGINE_ARGS[engine], *self.args.worker_args)
                if engine == "torch":
                    worker_args += tuple(self.args.torch_args)
                for mode in self.args.modes.split(","):
                    runs = []
                    for i in range(self.args.repeats):
                        row = await self._one(mode, worker_args, directory, session, tokens)
                        runs.append(row)
                        print(
                            f"{engine} {mode} {i + 1}/{self.args.repeats}: "
                            + " ".join(f"{k}={v:.3f}" for k, v in row.items()),
                            flush=True,
                        )
                    results[f"{engine}/{mode}"] = runs
        return results

    async def _one(
        self,
        mode: str,
        worker_args: tuple[str, ...],
        directory: WorkerDirectory,
        session: aiohttp.ClientSession,
        tokens: FirstTokens,
    ) -> dict[str, float]:
        self._num_starts += 1
        name = f"decode-{self._num_starts}"
        row: dict[str, float] = {}
        elapsed = Timer()
        if mode == "cold":
            proc = await self._exec(name, worker_command(worker_args))
        else:
            standby = await StandbyWorker.start(name, worker_args, self._exec)
            proc = standby.proc
            try:
                async with asyncio.timeout(120):
                    if not await standby.wait_warm():
                        raise RuntimeError(f"standby exited; see {self.log_dir}/{name}.log")
            except BaseException:
                await standby.stop(10)
                raise
            row["warm_s"] = elapsed()
            elapsed.start()
            await standby.hand_over()
        try:
            async with asyncio.timeout(120):
                await _registered_or_exited(directory, proc, f"{self.log_dir}/{name}.log")
                row["registered_s"] = elapsed()
                info = _registered(directory, proc.pid)
                assert info is not None, proc.pid
                assert info.http_url, info
                await _wait_ready(session, info.http_url)
                row["ready_s"] = elapsed()
                await tokens.first_token(info)
                row["first_token_s"] = elapsed()
        finally:
            await _stop(proc)
        return row


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarize(results: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for key, runs in results.items():
        summary[key] = {}
        for metric in ("warm_s", *METRICS):
            values = [r[metric] for r in runs if metric in r]
            if values:
                summary[key][metric] = {
                    "median": quantile(values, 0.5),
                    "p90": quantile(values, 0.9),
                    "min": min(values),
                    "max": max(values),
                }
    return summary


def print_table(summary: dict[str, dict[str, dict[str, float]]], repeats: int) -> None:
    print(f"\nstart-to-X in seconds over {repeats} starts: median / p90 / min / max")
    header = f"{'engine/mode':<16} {'metric':<14} {'median':>7} {'p90':>7} {'min':>7} {'max':>7}"
    print(header)
    for key, metrics in summary.items():
        for metric, s in metrics.items():
            print(
                f"{key:<16} {metric:<14} {s['median']:7.3f} {s['p90']:7.3f} "
                f"{s['min']:7.3f} {s['max']:7.3f}"
            )


@contextlib.contextmanager
def servers(log_dir: str) -> Iterator[tuple[str, str]]:
    with local_servers(log_dir) as (nats, etcd):
        yield nats.url, etcd.url


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--engines", default="sim,torch", help="comma-separated: sim, torch")
    p.add_argument("--modes", default="cold,standby", help="comma-separated: cold, standby")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--worker-args", nargs=argparse.REMAINDER, default=[], help="more worker flags (last)"
    )
    p.add_argument(
        "--torch-args", nargs="*", default=[], help="more flags for the torch engine's workers"
    )
    p.add_argument("--log-dir", default="", help="keep the workers' logs here")
    p.add_argument("--json", default="", help="write the runs and their summary here")
    args = p.parse_args()
    for engine in args.engines.split(","):
        if engine not in ENGINE_ARGS:
            p.error(f"unknown engine {engine!r}")
    for mode in args.modes.split(","):
        if mode not in ("cold", "standby"):
            p.error(f"unknown mode {mode!r}")
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="baton-worker-start-")
    args.log_dir = log_dir
    with servers(log_dir) as (nats_url, etcd_url):
        results = asyncio.run(Bench(args, nats_url, etcd_url).run())
    summary = summarize(results)
    print_table(summary, args.repeats)
    print(f"logs: {log_dir}")
    if args.json:
        report = {
            "args": vars(args),
            "host": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
            "load_average": os.getloadavg(),
            "summary": summary,
            "runs": results,
        }
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
