"""Live, decoded views of every key under an etcd prefix."""

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, Self, TypeVar, cast

import msgspec
from etcd3aio import prefix_range_end

from proto.messages import InstanceId, WorkerInfo
from proto.subjects import etcd_workers
from shared.codec import worker_info_decoder
from shared.discovery.retry import (
    ETCD_FAILURES,
    Backoff,
    describe,
    log_retry,
    stop_tasks,
)
from shared.errors import Unavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

# mvccpb.Event.EventType, spelled here so that we need not import the generated protobufs.
EVENT_DELETE: Final = 1


def key_text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="backslashreplace")


def decode_or_log(key: str, value: bytes, decode: Callable[[bytes], T]) -> T | None:
    """``decode(value)``, or None with a warning: one bad value must not stop a reader."""
    try:
        return decode(value)
    except msgspec.DecodeError as exc:
        logger.warning("undecodable etcd value skipped key=%s error=%s", key, exc)
        return None


if TYPE_CHECKING:
    from shared.discovery.client import Discovery


class WatchView(Generic[T]):
    """A live, decoded copy of every key under a prefix, kept by a task this object owns.

    ``async with`` lists the prefix (raising ``Unavailable`` if etcd is down) and then
    follows its changes. Waiting is level-triggered: ``wait_changed`` wakes after one or more
    changes, which it coalesces, and callers read ``items`` for the state. We chose that over
    an iterator of events because consumers (routers, frontends) need the current set, not
    its history, and because a re-list after an etcd restart yields a state, not events.
    """

    def __init__(self, discovery: "Discovery", prefix: str, decode: Callable[[bytes], T]) -> None:
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
            failures = await stop_tasks([task])
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
            item = decode_or_log(key, value, self._decode)
            if item is not None:
                fresh[key] = item
        self._revision = revision
        if fresh != self._items:
            self._items.clear()
            self._items.update(fresh)
            self._mark_changed()

    async def _follow_forever(self) -> None:
        backoff, p = Backoff(), self.prefix
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
                        log_retry(num_failures, "watch re-list failed prefix=%s error=%s", p, exc)
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
        except ETCD_FAILURES as exc:
            self._discovery._note_failure(exc)
            raise Unavailable(f"etcd watch of {self.prefix} failed: {describe(exc)}") from exc
        finally:
            await cast(AsyncGenerator[Any, None], stream).aclose()
        return is_created

    def _apply(self, events: Any, revision: int) -> None:
        is_changed = False
        for event in events:
            key = key_text(event.kv.key)
            item = None
            if event.type != EVENT_DELETE:
                item = decode_or_log(key, bytes(event.kv.value), self._decode)
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

    def __init__(self, discovery: "Discovery", namespace: str) -> None:
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
