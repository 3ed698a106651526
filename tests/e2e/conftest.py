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
    prefills: list[subprocess.Popen[bytes]] = field(default_factory=list)
    routers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    router_urls: list[str] = field(default_factory=list)

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


def wait_http(url: str, procs: list[subprocess.Popen[bytes]], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode} during start-up")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer in {timeout_s} s")


def service(module: str, *args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", module, *args], env=env)


@pytest.fixture
def start_cluster(
    nats_server: ServerProcess, etcd_server: ServerProcess, namespace: str
) -> Iterator[Callable[..., Cluster]]:
    """A factory: ``start_cluster(num_workers=2, worker_args=[...])`` -> a ready Cluster."""
    started: list[subprocess.Popen[bytes]] = []

    def start(
        num_workers: int = 2,
        worker_args: tuple[str, ...] = (),
        frontend_args: tuple[str, ...] = (),
        num_prefill: int = 0,
        prefill_args: tuple[str, ...] = (),
        num_routers: int = 0,
        router_args: tuple[str, ...] = (),
        namespace: str = namespace,
    ) -> Cluster:
        env = dict(os.environ)
        env.update(
            BATON_NAMESPACE=namespace,
            BATON_NATS_URL=nats_server.url,
            BATON_ETCD_URL=etcd_server.url,
            BATON_LOG_LEVEL="warning",
        )
        router_ports = [free_port() for _ in range(num_routers)]
        routers = [
            service("services.router", "--port", str(p), *router_args, env=env)
            for p in router_ports
        ]
        prefills = [
            service("services.worker", "--role", "prefill", *prefill_args, env=env)
            for _ in range(num_prefill)
        ]
        workers = [
            service("services.worker", "--role", "decode", *worker_args, env=env)
            for _ in range(num_workers)
        ]
        started.extend([*routers, *prefills, *workers])
        port = free_port()
        frontend = service("services.frontend", "--port", str(port), *frontend_args, env=env)
        started.append(frontend)
        url = f"http://127.0.0.1:{port}"
        procs = [*routers, *prefills, *workers, frontend]
        router_urls = [f"http://127.0.0.1:{p}" for p in router_ports]
        for router_url in router_urls:
            wait_http(f"{router_url}/ready", procs)
        wait_ready(url, num_workers + num_prefill, procs)
        return Cluster(
            url,
            namespace,
            nats_server.url,
            etcd_server.url,
            frontend,
            workers,
            prefills,
            routers,
            router_urls,
        )

    yield start
    for proc in reversed(started):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(started):
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            stop_process(proc)
