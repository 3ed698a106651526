"""The etcd client of a process: plain keys, leased registrations, watches, model cards."""

import asyncio
import contextlib
import logging
import socket
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, Final, Self, TypeVar, cast

import grpc.aio  # type: ignore[import-untyped]  # no grpc stubs in the venv; only the error type is used
from etcd3aio import Etcd3Client, prefix_range_end
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService
from etcd3aio.watch import WatchService

from proto.messages import ModelCard, WorkerInfo
from proto.subjects import etcd_model, etcd_models, etcd_worker
from shared.codec import encode, model_card_decoder
from shared.discovery.auth import EtcdLogin, is_token_refused
from shared.discovery.registration import Registration
from shared.discovery.retry import (
    BACKOFF_MAX_S,
    BACKOFF_MIN_S,
    ETCD_FAILURES,
    describe,
    stop_tasks,
)
from shared.discovery.watch import WatchView, WorkerDirectory, decode_or_log, key_text
from shared.errors import Unavailable
from shared.security import EtcdSecurity

logger = logging.getLogger(__name__)

T = TypeVar("T")

_DEFAULT_PORT: Final = 2379
_HINT_NO_USER: Final = " (etcd has authentication on: set --etcd-user and --etcd-password)"
# grpc's reconnect backoff grows to 120 s by default: after a long etcd outage the channel would
# sit out minutes while our leases expire. Measured: a 45 s outage cost 29 s more without these.
_RECONNECT_OPTIONS: Final = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),  # well inside a lease's grace after a restart
]


def _parse_url(url: str) -> tuple[bool, str, int]:
    """``http(s)://host:port`` (or bare ``host:port``) -> whether TLS, host and port."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"etcd url must look like http(s)://host:port, got {url!r}")
    return parts.scheme == "https", parts.hostname, parts.port or _DEFAULT_PORT


def _tls_args(host: str, security: EtcdSecurity) -> dict[str, Any]:
    """etcd3aio's TLS arguments: PEM bytes of the CA (the system's bundle if none is given)
    and the client pair, and the name to verify the server's certificate against (we dial
    an IPv4 address, so gRPC would check that instead of the URL's host)."""
    ca = security.etcd_tls_ca or ssl.get_default_verify_paths().cafile
    if not ca:
        raise ValueError("an https etcd url needs --etcd-tls-ca: this system has no CA bundle")
    args: dict[str, Any] = {"ca_cert": Path(ca).read_bytes(), "tls_server_name": host}
    if security.etcd_tls_cert:
        args["cert_chain"] = Path(security.etcd_tls_cert).read_bytes()
        args["cert_key"] = Path(security.etcd_tls_key).read_bytes()
    return args


async def _resolve_ipv4(host: str, port: int) -> str:
    # etcd3aio dials "ipv4:<host>:<port>", which accepts only IPv4 literals: resolve names here.
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, family=socket.AF_INET, type=socket.SOCK_STREAM
    )
    return str(infos[0][4][0])


class Discovery:
    """One etcd client per process: plain keys, leased registrations, watches, model cards.

    Open it with ``Discovery.connect``; leaving that block stops every keepalive and watch
    this object still owns and closes the channel.
    """

    def __init__(
        self,
        client: Etcd3Client,
        url: str,
        *,
        call_timeout_s: float,
        login: EtcdLogin | None = None,
    ) -> None:
        self._client = client
        self._url = url
        self.call_timeout_s = call_timeout_s
        self._login = login
        self._login_task: asyncio.Task[None] | None = None
        self._registrations: set[Registration] = set()
        self._views: set[WatchView[Any]] = set()
        self._is_closed = False

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, url: str, *, call_timeout_s: float = 5.0, security: EtcdSecurity | None = None
    ) -> AsyncIterator[Self]:
        """Connect to etcd at ``url`` (``http://host:port``, or ``https://`` for TLS) and
        close on exit; with ``security.etcd_user``, authenticate and keep the token valid.

        Raises ``Unavailable`` when etcd does not answer a read within ``call_timeout_s`` or
        refuses the credentials, so a service fails at startup instead of on its first
        registration.
        """
        if call_timeout_s <= 0:
            raise ValueError(f"call_timeout_s must be > 0, got {call_timeout_s}")
        security = security or EtcdSecurity()
        is_tls, host, port = _parse_url(url)
        if security.has_tls_files and not is_tls:
            raise ValueError(f"etcd TLS files are set but the url is not https: {url!r}")
        tls_args = _tls_args(host, security) if is_tls else {}
        try:
            address = await _resolve_ipv4(host, port)
        except OSError as exc:
            raise Unavailable(f"cannot resolve etcd host {host!r} of {url}: {exc}") from exc
        client = Etcd3Client(
            [f"{address}:{port}"],
            watch_reconnect_backoff_seconds=BACKOFF_MIN_S,
            watch_max_reconnect_backoff_seconds=BACKOFF_MAX_S,
            **tls_args,
        )
        # etcd3aio has no public knob for channel options; its ConnectionManager does.
        client._manager.grpc_options += _RECONNECT_OPTIONS
        await client.connect()
        login = None
        if security.etcd_user:
            login = EtcdLogin(
                client,
                url,
                security.etcd_user,
                security.etcd_password,
                call_timeout_s=call_timeout_s,
            )
        discovery = cls(client, url, call_timeout_s=call_timeout_s, login=login)
        try:
            if login is not None:
                await login.authenticate()
                discovery._login_task = asyncio.create_task(login.keep_valid(), name="etcd login")
            await discovery._call("connect", client.ping(write_check=False, timeout=call_timeout_s))
            logger.info("etcd connected url=%s user=%s", url, security.etcd_user or "-")
            yield discovery
        finally:
            await discovery.close()

    async def close(self) -> None:
        """Stop every keepalive and watch, then close the channel. Safe to call twice.

        Registrations are not revoked: their keys expire after their TTL, as after a crash.
        Graceful shutdown calls ``Registration.revoke`` first.
        """
        if self._is_closed:
            return
        self._is_closed = True
        tasks = [r._task for r in self._registrations if r._task is not None]
        tasks += [v._task for v in self._views if v._task is not None]
        if self._login_task is not None:
            tasks.append(self._login_task)
        self._registrations.clear()
        self._views.clear()
        try:
            for exc in await stop_tasks(tasks):
                logger.error("discovery task failed url=%s", self._url, exc_info=exc)
        finally:
            await self._client.close()
            logger.info("etcd closed url=%s", self._url)

    # --- plain keys --------------------------------------------------------------------------

    async def put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` with no lease: it stays until deleted."""
        await self._call(f"put {key}", self._kv.put(key, value, timeout=self.call_timeout_s))

    async def get(self, key: str) -> bytes | None:
        """The value of ``key``, or None if it does not exist."""
        response = await self._call(f"get {key}", self._kv.get(key, timeout=self.call_timeout_s))
        return bytes(response.kvs[0].value) if response.kvs else None

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        """Every key under ``prefix`` with its value, in key order."""
        items, _ = await self._list(prefix)
        return items

    async def delete(self, key: str) -> bool:
        """Delete ``key``; True if it existed."""
        response = await self._call(
            f"delete {key}", self._kv.delete(key, timeout=self.call_timeout_s)
        )
        return int(response.deleted) > 0

    # --- leases ------------------------------------------------------------------------------

    async def register(self, key: str, value: bytes, ttl_s: float = 10.0) -> "Registration":
        """Put ``key`` under a new lease of ``ttl_s`` (rounded up to whole seconds; etcd's
        floor is about 2 s) and keep it alive until ``revoke`` or ``close``.

        The key vanishes ``ttl_s`` after this process stops refreshing, which is how peers
        learn of a crash. Raises ``Unavailable`` if the first grant or put fails; later losses
        are repaired in the background.
        """
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self._check_open()
        registration = Registration(self, key, value, ttl_s)
        await registration._grant_and_put()
        registration._task = asyncio.create_task(
            registration._keep_alive(), name=f"etcd-keepalive {key}"
        )
        self._registrations.add(registration)
        logger.info(
            "registered key=%s lease_id=%x ttl_s=%d", key, registration.lease_id, registration.ttl_s
        )
        return registration

    async def register_worker(
        self, namespace: str, info: WorkerInfo, ttl_s: float = 10.0
    ) -> "Registration":
        """``register`` a worker's ``WorkerInfo`` at its key in ``namespace``."""
        return await self.register(etcd_worker(namespace, info.worker_id), encode(info), ttl_s)

    # --- watches -----------------------------------------------------------------------------

    def watch_prefix(self, prefix: str) -> "WatchView[bytes]":
        """A live view of every key under ``prefix``; use it as ``async with ... as view``."""
        return WatchView(self, prefix, bytes)

    def watch_workers(self, namespace: str) -> "WorkerDirectory":
        """A live ``WorkerDirectory`` of the workers registered in ``namespace``."""
        return WorkerDirectory(self, namespace)

    def watch_models(self, namespace: str) -> "WatchView[ModelCard]":
        """A live view of the model cards registered in ``namespace`` (key -> card)."""
        return WatchView(self, etcd_models(namespace), model_card_decoder.decode)

    # --- model registry ----------------------------------------------------------------------

    async def put_model(self, namespace: str, card: ModelCard) -> None:
        """Store ``card`` under its name, without a lease: the card outlives any one worker.

        Each worker puts its card again at startup, so a changed card (a new context length,
        say) takes effect when the first worker of the new version starts.
        """
        await self.put(etcd_model(namespace, card.name), encode(card))

    async def get_model(self, namespace: str, name: str) -> ModelCard | None:
        """The card of model ``name``, or None if absent (or unreadable, which is logged)."""
        key = etcd_model(namespace, name)
        value = await self.get(key)
        return None if value is None else decode_or_log(key, value, model_card_decoder.decode)

    async def list_models(self, namespace: str) -> list[ModelCard]:
        """Every readable model card in ``namespace``, in name order; bad values are logged."""
        cards = []
        for key, value in (await self.get_prefix(etcd_models(namespace))).items():
            card = decode_or_log(key, value, model_card_decoder.decode)
            if card is not None:
                cards.append(card)
        return cards

    # --- internals shared with Registration and WatchView -------------------------------------

    @property
    def _kv(self) -> KVService:
        self._check_open()
        return cast(KVService, self._client.kv)  # set by connect(), cleared only by close()

    @property
    def _lease(self) -> LeaseService:
        self._check_open()
        return cast(LeaseService, self._client.lease)

    @property
    def _watch(self) -> WatchService:
        self._check_open()
        return cast(WatchService, self._client.watch)

    def _check_open(self) -> None:
        if self._is_closed:
            raise RuntimeError(f"Discovery for {self._url} is closed")

    async def _call(self, what: str, awaitable: Awaitable[T]) -> T:
        """Await one etcd call and turn its failures into ``Unavailable``."""
        try:
            return await awaitable
        except ETCD_FAILURES as exc:
            self._note_failure(exc)
            hint = _HINT_NO_USER if "user name is empty" in describe(exc) else ""
            raise Unavailable(f"etcd {what} failed at {self._url}: {describe(exc)}{hint}") from exc

    def _note_failure(self, exc: BaseException) -> None:
        """A call failed: if etcd refused its token, have the login authenticate again."""
        if self._login is not None and is_token_refused(exc):
            self._login.renew_soon()

    async def _list(self, prefix: str) -> tuple[dict[str, bytes], int]:
        """Every key under ``prefix`` and the revision the listing was read at."""
        response = await self._call(
            f"list {prefix}",
            self._kv.get(prefix, range_end=prefix_range_end(prefix), timeout=self.call_timeout_s),
        )
        items = {key_text(kv.key): bytes(kv.value) for kv in response.kvs}
        return items, int(response.header.revision)

    async def _keep_alive_once(self, lease_id: int, timeout_s: float) -> int:
        """Refresh ``lease_id`` once; the TTL etcd answered, 0 if the lease no longer exists."""
        call = self._lease.keep_alive(lease_id)
        try:
            async with asyncio.timeout(timeout_s):
                response = await call.read()
        except ETCD_FAILURES as exc:
            self._note_failure(exc)
            raise Unavailable(
                f"etcd keepalive of lease {lease_id:x} failed: {describe(exc)}"
            ) from exc
        finally:
            call.cancel()
        if response is grpc.aio.EOF:
            raise Unavailable(f"etcd closed the keepalive stream of lease {lease_id:x}")
        return int(response.TTL)
