"""A key kept alive under a lease that re-registers itself after the lease is lost."""

import asyncio
import contextlib
import logging
import math
from typing import TYPE_CHECKING, Final, TypeVar

import grpc.aio  # type: ignore[import-untyped]  # no grpc stubs in the venv; only the error type is used

from shared.discovery.retry import (
    Backoff,
    log_retry,
    stop_tasks,
)
from shared.errors import Unavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

if TYPE_CHECKING:
    from shared.discovery.client import Discovery


class Registration:
    """A key kept alive under a lease by a background task owned by this object.

    If the lease is lost, the task grants a new one and puts the latest value again, retrying
    with bounded backoff until etcd answers. ``lease_id`` therefore changes over time. A plain
    etcd restart rarely loses it: etcd restarts every lease's full TTL when it comes back, and
    we reconnect within about a second.
    """

    def __init__(self, discovery: "Discovery", key: str, value: bytes, ttl_s: float) -> None:
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
            for exc in await stop_tasks([self._task]):
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
        backoff = Backoff(max_s=self._granted_ttl_s / 3)
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
                log_retry(num_failures, "lease keepalive failed key=%s error=%s", self.key, exc)
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

    async def _register_again(self, backoff: Backoff) -> None:
        num_failures = 0
        while True:
            try:
                await self._grant_and_put()
            except Unavailable as exc:
                num_failures += 1
                log_retry(num_failures, "re-registration failed key=%s error=%s", self.key, exc)
                await asyncio.sleep(backoff.next_s())
            else:
                logger.warning("registered again key=%s lease_id=%x", self.key, self._lease_id)
                return
