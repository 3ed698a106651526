"""etcd for Baton: leases that re-register themselves, live prefix views, the model registry.

A thin asyncio layer over etcd3aio (docs/decisions/0002-etcd-client.md says why that client).
What it adds to the client:

- every unary call is bounded by ``call_timeout_s`` and every etcd failure surfaces as
  ``Unavailable``, so callers handle one error class;
- ``register`` keeps a key alive under a lease and, when the lease is lost (etcd restarted
  and the lease expired, or someone revoked it), grants a new one and puts the key again;
- ``watch_prefix`` keeps a dict of every key under a prefix, listed once and then watched from
  the listed revision + 1, so no event falls between the list and the watch; after a
  reconnect or a compaction it lists and watches again.

Keys are ``str`` (built by ``proto.subjects``), values ``bytes``; typed values are msgpack via
``shared.codec``. Every background task is owned by a ``Registration`` or a ``WatchView``, and
``Discovery.close`` stops whichever are still running.
"""

import asyncio
import contextlib
import logging
import math
import random
import socket
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from types import MappingProxyType, TracebackType
from typing import Any, Final, Generic, Self, TypeVar, cast

import grpc.aio  # type: ignore[import-untyped]  # no grpc stubs in the venv; only the error type is used
import msgspec
from etcd3aio import Etcd3Client, EtcdError, prefix_range_end
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService
from etcd3aio.watch import WatchService

from proto.messages import InstanceId, ModelCard, WorkerInfo
from proto.subjects import etcd_model, etcd_models, etcd_worker, etcd_workers
from shared.codec import encode, model_card_decoder, worker_info_decoder
from shared.errors import Unavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

_DEFAULT_PORT: Final = 2379
_BACKOFF_MIN_S: Final = 0.1
_BACKOFF_MAX_S: Final = 2.0
# mvccpb.Event.EventType, spelled here so that we need not import the generated protobufs.
_EVENT_DELETE: Final = 1
# grpc's reconnect backoff grows to 120 s by default: after a long etcd outage the channel would
# sit out minutes while our leases expire. Measured: a 45 s outage cost 29 s more without these.
_RECONNECT_OPTIONS: Final = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),  # well inside a lease's grace after a restart
]
# What etcd3aio and grpc raise for an etcd that is down, slow or refusing.
_ETCD_FAILURES: Final = (EtcdError, grpc.aio.AioRpcError, TimeoutError)


class _Backoff:
    """Jittered exponential delay between retries, capped so recovery stays prompt."""

    def __init__(self, max_s: float = _BACKOFF_MAX_S) -> None:
        self._max_s = max(max_s, _BACKOFF_MIN_S)
        self._delay_s = _BACKOFF_MIN_S

    def reset(self) -> None:
        self._delay_s = _BACKOFF_MIN_S

    def next_s(self) -> float:
        delay_s = self._delay_s * random.uniform(0.5, 1.0)  # jitter: workers retry apart
        self._delay_s = min(self._delay_s * 2, self._max_s)
        return delay_s


async def _stop_tasks(tasks: list[asyncio.Task[None]]) -> list[BaseException]:
    """Cancel ``tasks``, wait for them and return what they failed with (not cancellations)."""
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
    return [exc for t in tasks if not t.cancelled() and (exc := t.exception()) is not None]


def _parse_url(url: str) -> tuple[str, int]:
    """``http://host:port`` (or bare ``host:port``) -> host and port; TLS is not configured."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"etcd url must look like http://host:port, got {url!r}")
    return parts.hostname, parts.port or _DEFAULT_PORT


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

    def __init__(self, client: Etcd3Client, url: str, *, call_timeout_s: float) -> None:
        self._client = client
        self._url = url
        self.call_timeout_s = call_timeout_s
        self._registrations: set[Registration] = set()
        self._views: set[WatchView[Any]] = set()
        self._is_closed = False

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, url: str, *, call_timeout_s: float = 5.0) -> AsyncIterator[Self]:
        """Connect to etcd at ``url`` (``http://host:port``) and close on exit.

        Raises ``Unavailable`` when etcd does not answer a read within ``call_timeout_s``, so
        a service fails at startup instead of on its first registration.
        """
        if call_timeout_s <= 0:
            raise ValueError(f"call_timeout_s must be > 0, got {call_timeout_s}")
        host, port = _parse_url(url)
        try:
            address = await _resolve_ipv4(host, port)
        except OSError as exc:
            raise Unavailable(f"cannot resolve etcd host {host!r} of {url}: {exc}") from exc
        client = Etcd3Client(
            [f"{address}:{port}"],
            watch_reconnect_backoff_seconds=_BACKOFF_MIN_S,
            watch_max_reconnect_backoff_seconds=_BACKOFF_MAX_S,
        )
        # etcd3aio has no public knob for channel options; its ConnectionManager does.
        client._manager.grpc_options += _RECONNECT_OPTIONS
        await client.connect()
        discovery = cls(client, url, call_timeout_s=call_timeout_s)
        try:
            await discovery._call("connect", client.ping(write_check=False, timeout=call_timeout_s))
            logger.info("etcd connected url=%s", url)
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
        self._registrations.clear()
        self._views.clear()
        try:
            for exc in await _stop_tasks(tasks):
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
        return None if value is None else _decode_or_log(key, value, model_card_decoder.decode)

    async def list_models(self, namespace: str) -> list[ModelCard]:
        """Every readable model card in ``namespace``, in name order; bad values are logged."""
        cards = []
        for key, value in (await self.get_prefix(etcd_models(namespace))).items():
            card = _decode_or_log(key, value, model_card_decoder.decode)
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
        except _ETCD_FAILURES as exc:
            raise Unavailable(f"etcd {what} failed at {self._url}: {_describe(exc)}") from exc

    async def _list(self, prefix: str) -> tuple[dict[str, bytes], int]:
        """Every key under ``prefix`` and the revision the listing was read at."""
        response = await self._call(
            f"list {prefix}",
            self._kv.get(prefix, range_end=prefix_range_end(prefix), timeout=self.call_timeout_s),
        )
        items = {_key(kv.key): bytes(kv.value) for kv in response.kvs}
        return items, int(response.header.revision)

    async def _keep_alive_once(self, lease_id: int, timeout_s: float) -> int:
        """Refresh ``lease_id`` once; the TTL etcd answered, 0 if the lease no longer exists."""
        call = self._lease.keep_alive(lease_id)
        try:
            async with asyncio.timeout(timeout_s):
                response = await call.read()
        except _ETCD_FAILURES as exc:
            raise Unavailable(
                f"etcd keepalive of lease {lease_id:x} failed: {_describe(exc)}"
            ) from exc
        finally:
            call.cancel()
        if response is grpc.aio.EOF:
            raise Unavailable(f"etcd closed the keepalive stream of lease {lease_id:x}")
        return int(response.TTL)


def _describe(exc: BaseException) -> str:
    """One line for a log or an error message; grpc's own repr spans five."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name} {exc.details()}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _log_retry(num_failures: int, message: str, *args: object) -> None:
    """Warn on the first failure of an outage; the retries after it go to DEBUG."""
    logger.log(logging.WARNING if num_failures == 1 else logging.DEBUG, message, *args)


def _key(raw: bytes) -> str:
    return raw.decode("utf-8", errors="backslashreplace")


def _decode_or_log(key: str, value: bytes, decode: Callable[[bytes], T]) -> T | None:
    """``decode(value)``, or None with a warning: one bad value must not stop a reader."""
    try:
        return decode(value)
    except msgspec.DecodeError as exc:
        logger.warning("undecodable etcd value skipped key=%s error=%s", key, exc)
        return None


class Registration:
    """A key kept alive under a lease by a background task owned by this object.

    If the lease is lost, the task grants a new one and puts the latest value again, retrying
    with bounded backoff until etcd answers. ``lease_id`` therefore changes over time. A plain
    etcd restart rarely loses it: etcd restarts every lease's full TTL when it comes back, and
    we reconnect within about a second.
    """

    def __init__(self, discovery: Discovery, key: str, value: bytes, ttl_s: float) -> None:
        self._discovery = discovery
        self.key: Final = key
        self.ttl_s: Final = max(1, math.ceil(ttl_s))
        self._value = value
        self._lease_id = 0
        self._granted_ttl_s = float(self.ttl_s)
        self._put_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._is_revoked = False

    @property
    def value(self) -> bytes:
        """The latest value given; what a re-registration puts."""
        return self._value

    @property
    def lease_id(self) -> int:
        """The lease the key is under now; a new one after each re-registration."""
        return self._lease_id

    async def update(self, value: bytes) -> None:
        """Put ``value`` under the current lease.

        The value is kept even if the put fails (``Unavailable``): the keepalive task, woken
        at once, puts it again when it re-registers.
        """
        if self._is_revoked:
            raise RuntimeError(f"registration of {self.key} was revoked")
        self._value = value
        async with self._put_lock:
            try:
                await self._discovery._call(
                    f"put {self.key}",
                    self._discovery._kv.put(
                        self.key,
                        value,
                        lease=self._lease_id,
                        timeout=self._discovery.call_timeout_s,
                    ),
                )
            except Unavailable:
                self._wake.set()
                raise

    async def revoke(self) -> None:
        """Stop the keepalive and revoke the lease, deleting the key. Safe to call twice.

        This is the first step of graceful shutdown: routers stop choosing us at once instead
        of after the TTL. Never raises for an unreachable etcd (the key then expires after
        ``ttl_s``), so shutdown goes on to drain.
        """
        if self._is_revoked:
            return
        self._is_revoked = True
        self._discovery._registrations.discard(self)
        if self._task is not None:
            for exc in await _stop_tasks([self._task]):
                logger.error("keepalive task failed key=%s", self.key, exc_info=exc)
            self._task = None
        if self._discovery._is_closed:
            logger.warning(
                "revoke after close; key expires after ttl key=%s lease_id=%x ttl_s=%d",
                self.key,
                self._lease_id,
                self.ttl_s,
            )
            return
        try:
            await self._discovery._call(
                f"revoke lease {self._lease_id:x}",
                self._discovery._lease.revoke(
                    self._lease_id, timeout=self._discovery.call_timeout_s
                ),
            )
        except Unavailable as exc:
            cause = exc.__cause__
            if (
                isinstance(cause, grpc.aio.AioRpcError)
                and cause.code() == grpc.StatusCode.NOT_FOUND
            ):
                return  # the lease had already expired: the key is gone either way
            logger.warning(
                "lease revoke failed; key expires after ttl key=%s lease_id=%x ttl_s=%d error=%s",
                self.key,
                self._lease_id,
                self.ttl_s,
                exc,
            )
        else:
            logger.info("lease revoked key=%s lease_id=%x", self.key, self._lease_id)

    async def _grant_and_put(self) -> None:
        discovery = self._discovery
        lease = await discovery._call(
            f"grant lease for {self.key}",
            discovery._lease.grant(self.ttl_s, timeout=discovery.call_timeout_s),
        )
        async with self._put_lock:
            # Adopt the lease before the put: a revoke that cancels us mid-put must revoke this
            # one. If the put fails, the caller grants again, so no lease is left without key.
            self._lease_id = int(lease.ID)
            self._granted_ttl_s = float(lease.TTL)
            await discovery._call(
                f"put {self.key}",
                discovery._kv.put(
                    self.key, self._value, lease=self._lease_id, timeout=discovery.call_timeout_s
                ),
            )

    async def _keep_alive(self) -> None:
        backoff = _Backoff(max_s=self._granted_ttl_s / 3)
        delay_s = self._granted_ttl_s / 3
        num_failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await self._wake.wait()
            self._wake.clear()
            refresh_timeout_s = min(self._discovery.call_timeout_s, self._granted_ttl_s / 3)
            try:
                ttl_s = await self._discovery._keep_alive_once(self._lease_id, refresh_timeout_s)
            except Unavailable as exc:
                delay_s = backoff.next_s()
                num_failures += 1
                _log_retry(num_failures, "lease keepalive failed key=%s error=%s", self.key, exc)
                continue
            if num_failures:
                logger.info(
                    "lease keepalive restored key=%s num_failures=%d", self.key, num_failures
                )
                num_failures = 0
            if ttl_s <= 0:
                logger.warning(
                    "lease lost; registering again key=%s lease_id=%x", self.key, self._lease_id
                )
                await self._register_again(backoff)
                ttl_s = int(self._granted_ttl_s)
            backoff.reset()
            delay_s = ttl_s / 3

    async def _register_again(self, backoff: _Backoff) -> None:
        num_failures = 0
        while True:
            try:
                await self._grant_and_put()
            except Unavailable as exc:
                num_failures += 1
                _log_retry(num_failures, "re-registration failed key=%s error=%s", self.key, exc)
                await asyncio.sleep(backoff.next_s())
            else:
                logger.warning("registered again key=%s lease_id=%x", self.key, self._lease_id)
                return


class WatchView(Generic[T]):
    """A live, decoded copy of every key under a prefix, kept by a task this object owns.

    ``async with`` lists the prefix (raising ``Unavailable`` if etcd is down) and then
    follows its changes. Waiting is level-triggered: ``wait_changed`` wakes after one or more
    changes, which it coalesces, and callers read ``items`` for the state. We chose that over
    an iterator of events because consumers (routers, frontends) need the current set, not
    its history, and because a re-list after an etcd restart yields a state, not events.
    """

    def __init__(self, discovery: Discovery, prefix: str, decode: Callable[[bytes], T]) -> None:
        self._discovery = discovery
        self.prefix: Final = prefix
        self._decode = decode
        self._items: dict[str, T] = {}
        self._items_view = MappingProxyType(self._items)
        self._revision = 0
        self._version = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def items(self) -> Mapping[str, T]:
        """Key -> decoded value, read-only and live: it changes while the caller awaits."""
        return self._items_view

    @property
    def revision(self) -> int:
        """The etcd revision the view reflects."""
        return self._revision

    @property
    def version(self) -> int:
        """Counts the changes seen, so a caller can cache what it derives from ``items``."""
        return self._version

    async def __aenter__(self) -> Self:
        await self._relist()
        self._task = asyncio.create_task(self._follow_forever(), name=f"etcd-watch {self.prefix}")
        self._discovery._views.add(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._discovery._views.discard(self)
        task, self._task = self._task, None
        if task is not None:
            failures = await _stop_tasks([task])
            if failures and exc is None:
                raise failures[0]

    async def wait_changed(self) -> None:
        """Return after ``items`` changed at least once since the call.

        Raises ``Unavailable`` if the view is closed or its task died. Bound it with
        ``asyncio.timeout``: with no changes it waits forever.
        """
        changed = self._changed
        self._check_following()
        await changed.wait()
        self._check_following()

    async def follow(self, apply: Callable[[Mapping[str, T]], None]) -> None:
        """Call ``apply(items)`` now and after every change, until cancelled (the way a
        service mirrors a directory into its own state)."""
        while True:
            apply(self.items)
            await self.wait_changed()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` is true, checking it after every change.

        The predicate reads the view itself, as in
        ``await view.wait_for(lambda: key in view.items)``; the caller sets the deadline.
        """
        while not predicate():
            await self.wait_changed()

    def _check_following(self) -> None:
        if self._task is None or self._task.done():
            raise Unavailable(f"watch of {self.prefix} is not running")

    def _mark_changed(self) -> None:
        self._version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def _relist(self) -> None:
        raw, revision = await self._discovery._list(self.prefix)
        fresh = {}
        for key, value in raw.items():
            item = _decode_or_log(key, value, self._decode)
            if item is not None:
                fresh[key] = item
        self._revision = revision
        if fresh != self._items:
            self._items.clear()
            self._items.update(fresh)
            self._mark_changed()

    async def _follow_forever(self) -> None:
        backoff, p = _Backoff(), self.prefix
        try:
            while True:
                try:
                    if await self._follow():
                        backoff.reset()
                except Unavailable as exc:
                    logger.warning("watch interrupted prefix=%s error=%s", self.prefix, exc)
                num_failures = 0
                while True:
                    await asyncio.sleep(backoff.next_s())
                    try:
                        await self._relist()
                        break
                    except Unavailable as exc:
                        num_failures += 1
                        _log_retry(num_failures, "watch re-list failed prefix=%s error=%s", p, exc)
                logger.info("watch re-listed prefix=%s revision=%d", self.prefix, self._revision)
        finally:
            self._changed.set()  # wake waiters so they see the view has stopped

    async def _follow(self) -> bool:
        """Apply watch events from ``revision + 1`` until the stream must be rebuilt.

        etcd3aio reconnects a broken watch by itself; a second ``created`` response shows it
        did, and we then re-list rather than trust the resumed stream. Returns whether the
        watch was established at all (to reset the caller's backoff).
        """
        stream = self._discovery._watch.watch(
            self.prefix, range_end=prefix_range_end(self.prefix), start_revision=self._revision + 1
        )
        is_created = False
        try:
            async for response in stream:
                if response.created:
                    if is_created:
                        return True  # etcd3aio reconnected under us
                    is_created = True
                    if response.header.revision < self._revision:
                        logger.warning(
                            "etcd revision went back; re-listing prefix=%s revision=%d was=%d",
                            self.prefix,
                            response.header.revision,
                            self._revision,
                        )
                        return True  # a new cluster (wiped data): our revision means nothing
                    continue
                if response.canceled or response.compact_revision:
                    logger.warning(
                        "watch cancelled by etcd prefix=%s compact_revision=%d reason=%s",
                        self.prefix,
                        response.compact_revision,
                        response.cancel_reason,
                    )
                    return is_created
                self._apply(response.events, int(response.header.revision))
        except _ETCD_FAILURES as exc:
            raise Unavailable(f"etcd watch of {self.prefix} failed: {_describe(exc)}") from exc
        finally:
            await cast(AsyncGenerator[Any, None], stream).aclose()
        return is_created

    def _apply(self, events: Any, revision: int) -> None:
        is_changed = False
        for event in events:
            key = _key(event.kv.key)
            item = None
            if event.type != _EVENT_DELETE:
                item = _decode_or_log(key, bytes(event.kv.value), self._decode)
            if item is not None:
                self._items[key] = item
                is_changed = True
            elif key in self._items:
                del self._items[key]
                is_changed = True
        self._revision = max(self._revision, revision)
        if is_changed:
            self._mark_changed()


class WorkerDirectory(WatchView[WorkerInfo]):
    """The live workers of one namespace, decoded as ``WorkerInfo``.

    A value that does not decode is logged and left out rather than stopping the watch: one
    worker of a newer, incompatible version must not blind every router.
    """

    def __init__(self, discovery: Discovery, namespace: str) -> None:
        super().__init__(discovery, etcd_workers(namespace), worker_info_decoder.decode)
        self._workers: dict[InstanceId, WorkerInfo] = {}
        self._workers_version = -1

    @property
    def workers(self) -> dict[InstanceId, WorkerInfo]:
        """Worker id (the last part of its key) -> info; a new dict after each change, so the
        caller may keep it as a snapshot but must not change it."""
        if self._workers_version != self.version:
            start = len(self.prefix)
            self._workers = {InstanceId(k[start:]): v for k, v in self.items.items()}
            self._workers_version = self.version
        return self._workers
