"""NATS for Baton: connect with reconnect, publish, request-reply and subscriptions.

A thin typed layer over nats-py. It adds what the services rely on:

- every message is a ``proto`` struct encoded once with msgpack;
- a message larger than the server's ``max_payload`` (headers included) raises
  ``PayloadTooLarge`` before anything is sent, instead of the server closing the connection;
- request-reply failures become ``Unavailable`` (no responder) or ``DeadlineExceeded``.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Self

import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared.codec import encode
from shared.errors import DeadlineExceeded, PayloadTooLarge, Unavailable

logger = logging.getLogger(__name__)

# A subscription that falls this far behind drops messages (nats-py's slow-consumer rule), so
# the busy ones (token inboxes) get room for a long burst.
_PENDING_MSGS_LIMIT = 1_000_000
_PENDING_BYTES_LIMIT = 1024 * 1024 * 1024

Handler = Callable[[Msg], Awaitable[None]]


class Bus:
    """One NATS connection shared by everything in a process."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._closed = False

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, url: str, *, name: str = "baton", connect_timeout_s: float = 5.0
    ) -> AsyncIterator[Self]:
        """Connect (retrying forever once connected; reconnects keep subscriptions) and close
        on exit. Raises ``Unavailable`` if the first connection fails."""
        try:
            client = await nats.connect(
                url,
                name=name,
                connect_timeout=int(max(1, connect_timeout_s)),
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                allow_reconnect=True,
                error_cb=_log_error,
                disconnected_cb=_log_disconnected,
                reconnected_cb=_log_reconnected,
                pending_size=64 * 1024 * 1024,
            )
        except (OSError, nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"cannot connect to NATS at {url}: {exc!r}") from exc
        bus = cls(client)
        try:
            yield bus
        finally:
            await bus.close()

    @property
    def max_payload(self) -> int:
        """The server's limit on one message, headers included."""
        return int(self._client.max_payload)

    @property
    def is_connected(self) -> bool:
        return bool(self._client.is_connected)

    def check_size(self, payload: bytes, headers_size: int = 0) -> None:
        """Raise ``PayloadTooLarge`` if this payload cannot be sent."""
        size = len(payload) + headers_size
        if size > self.max_payload:
            raise PayloadTooLarge(size, self.max_payload)

    async def publish(self, subject: str, message: msgspec.Struct, *, reply: str = "") -> None:
        await self.publish_bytes(subject, encode(message), reply=reply)

    async def publish_bytes(self, subject: str, payload: bytes, *, reply: str = "") -> None:
        """Publish raw bytes; buffered while reconnecting, refused if over ``max_payload``."""
        self.check_size(payload)
        try:
            await self._client.publish(subject, payload, reply=reply)
        except nats.errors.OutboundBufferLimitError as exc:
            raise Unavailable("NATS is disconnected and the outbound buffer is full") from exc
        except nats.errors.ConnectionClosedError as exc:
            raise Unavailable("NATS connection is closed") from exc

    async def request(self, subject: str, message: msgspec.Struct, *, timeout_s: float) -> bytes:
        """Send and wait for one reply's bytes. ``Unavailable`` if nobody listens on the subject,
        ``DeadlineExceeded`` if no reply comes within ``timeout_s``."""
        payload = encode(message)
        self.check_size(payload)
        try:
            msg = await self._client.request(subject, payload, timeout=timeout_s)
        except nats.errors.NoRespondersError as exc:
            raise Unavailable(f"no responder on {subject}") from exc
        except nats.errors.TimeoutError as exc:
            raise DeadlineExceeded(f"no reply on {subject} within {timeout_s} s") from exc
        except nats.errors.ConnectionClosedError as exc:
            raise Unavailable("NATS connection is closed") from exc
        data: bytes = msg.data
        return data

    async def subscribe(self, subject: str, handler: Handler, *, queue: str = "") -> Subscription:
        """Call ``handler`` for each message, one at a time in arrival order. A handler that
        raises is logged and the subscription goes on (one bad message never stops it).
        Returns once the server has the subscription."""

        async def guarded(msg: Msg) -> None:
            try:
                await handler(msg)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("bus handler failed subject=%s", msg.subject)

        sub: Subscription = await self._client.subscribe(
            subject,
            queue=queue,
            cb=guarded,
            pending_msgs_limit=_PENDING_MSGS_LIMIT,
            pending_bytes_limit=_PENDING_BYTES_LIMIT,
        )
        # Make the server know the subscription before anyone is told it exists.
        await self.flush()
        return sub

    async def flush(self, timeout_s: float = 5.0) -> None:
        await self._client.flush(timeout=int(max(1, timeout_s)))

    async def close(self) -> None:
        """Flush what is buffered and close. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if not self._client.is_closed:
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                await self._client.drain()
            await self._client.close()


async def _log_error(exc: Exception) -> None:
    logger.warning("nats error error=%r", exc)


async def _log_disconnected() -> None:
    logger.warning("nats disconnected")


async def _log_reconnected() -> None:
    logger.info("nats reconnected")
