"""Start Baton's services through their CLIs against the session's nats-server and etcd."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from shared.servers import ServerProcess, free_port, stop_process


@dataclass
class Cluster:
    url: str
    namespace: str
    nats_url: str
    etcd_url: str
    frontend: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def api(self) -> str:
        return f"{self.url}/v1"


def wait_ready(
    url: str, num_workers: int, procs: list[subprocess.Popen[bytes]], timeout_s: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode} during start-up")
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=1) as resp:
                body = json.loads(resp.read())
            if body["ready"] and body["workers"] >= num_workers:
                return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"cluster at {url} not ready with {num_workers} workers in {timeout_s} s")


def service(module: str, *args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", module, *args], env=env)


@pytest.fixture
def start_cluster(
    nats_server: ServerProcess, etcd_server: ServerProcess, namespace: str
) -> Iterator[Callable[..., Cluster]]:
    """A factory: ``start_cluster(num_workers=2, worker_args=[...])`` -> a ready Cluster."""
    started: list[subprocess.Popen[bytes]] = []

    def start(
        num_workers: int = 2, worker_args: tuple[str, ...] = (), frontend_args: tuple[str, ...] = ()
    ) -> Cluster:
        env = dict(os.environ)
        env.update(
            BATON_NAMESPACE=namespace,
            BATON_NATS_URL=nats_server.url,
            BATON_ETCD_URL=etcd_server.url,
            BATON_LOG_LEVEL="warning",
        )
        workers = [service("services.decode", *worker_args, env=env) for _ in range(num_workers)]
        started.extend(workers)
        port = free_port()
        frontend = service("services.frontend", "--port", str(port), *frontend_args, env=env)
        started.append(frontend)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, num_workers, [*workers, frontend])
        return Cluster(url, namespace, nats_server.url, etcd_server.url, frontend, workers)

    yield start
    for proc in reversed(started):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(started):
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            stop_process(proc)
