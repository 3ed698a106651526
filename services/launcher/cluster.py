"""Start and stop a local cluster: servers, workers, frontend, as child processes."""

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from services.launcher.config import UpConfig
from shared.servers import ServerProcess, free_port, start_etcd, start_nats

logger = logging.getLogger(__name__)


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process


async def _spawn(
    name: str, module: str, args: list[str], env: dict[str, str], log_dir: str
) -> Child:
    # A local file opened once per child at start-up: not worth a thread.
    out = open(Path(log_dir) / f"{name}.log", "ab") if log_dir else None  # noqa: SIM115, ASYNC230
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        env=env,
        stdout=out if out else None,
        stderr=asyncio.subprocess.STDOUT if out else None,
    )
    if out:
        out.close()
    logger.info("started %s pid=%d", name, proc.pid)
    return Child(name, proc)


async def _stop(child: Child, timeout_s: float) -> None:
    if child.proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        child.proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(timeout_s):
            await child.proc.wait()
    except TimeoutError:
        logger.warning("%s did not stop in %.0f s; killing", child.name, timeout_s)
        with contextlib.suppress(ProcessLookupError):
            child.proc.kill()
        await child.proc.wait()


def _ready(url: str, num_workers: int) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ready", timeout=1.0) as resp:
            body = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return bool(body.get("ready")) and int(body.get("workers", 0)) >= num_workers


@dataclass
class Cluster:
    url: str
    nats_url: str
    etcd_url: str
    children: list[Child]


@contextlib.asynccontextmanager
async def local_cluster(config: UpConfig) -> AsyncIterator[Cluster]:
    """Run a whole cluster for the duration of the block; stop it in reverse order."""
    if config.log_dir:
        os.makedirs(config.log_dir, exist_ok=True)
    servers: list[ServerProcess] = []
    children: list[Child] = []
    try:
        nats_url, etcd_url = config.nats_url, config.etcd_url
        if not nats_url:
            log = os.path.join(config.log_dir, "nats.log") if config.log_dir else None
            servers.append(await asyncio.to_thread(start_nats, log_path=log))
            nats_url = servers[-1].url
        if not etcd_url:
            log = os.path.join(config.log_dir, "etcd.log") if config.log_dir else None
            servers.append(await asyncio.to_thread(start_etcd, log_path=log))
            etcd_url = servers[-1].url
        env = dict(os.environ)
        env.update(
            BATON_NAMESPACE=config.namespace,
            BATON_NATS_URL=nats_url,
            BATON_ETCD_URL=etcd_url,
            BATON_LOG_LEVEL=config.log_level,
        )
        engine_args = [
            "--model",
            config.model,
            "--engine",
            config.engine,
            "--speedup",
            str(config.speedup),
        ]
        for i in range(config.num_routers):
            children.append(
                await _spawn(
                    f"router-{i}",
                    "services.router",
                    ["--mode", config.router_mode],
                    env,
                    config.log_dir,
                )
            )
        for i in range(config.num_prefill_workers):
            children.append(
                await _spawn(
                    f"prefill-{i}",
                    "services.worker",
                    ["--role", "prefill", *engine_args],
                    env,
                    config.log_dir,
                )
            )
        for i in range(config.num_workers):
            children.append(
                await _spawn(
                    f"decode-{i}",
                    "services.worker",
                    ["--role", "decode", *engine_args],
                    env,
                    config.log_dir,
                )
            )
        port = config.port or free_port()
        children.append(
            await _spawn(
                "frontend",
                "services.frontend",
                ["--host", config.host, "--port", str(port)],
                env,
                config.log_dir,
            )
        )
        url = f"http://{config.host}:{port}"
        async with asyncio.timeout(config.ready_timeout_s):
            while not await asyncio.to_thread(
                _ready, url, config.num_workers + config.num_prefill_workers
            ):
                for child in children:
                    if child.proc.returncode is not None:
                        raise RuntimeError(
                            f"{child.name} exited with code {child.proc.returncode} during start-up"
                        )
                await asyncio.sleep(0.2)
        yield Cluster(url=url, nats_url=nats_url, etcd_url=etcd_url, children=children)
    finally:
        # Frontend first (it stops taking requests), then workers, then the servers.
        for child in reversed(children):
            await _stop(child, timeout_s=40.0)
        for server in reversed(servers):
            await asyncio.to_thread(server.stop)
            if server.data_dir:
                shutil.rmtree(server.data_dir, ignore_errors=True)
