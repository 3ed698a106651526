"""NATS for Baton: connect with reconnect, publish, request-reply and subscriptions.

A thin typed layer over nats-py. It adds what the services rely on:

- every message is a ``proto`` struct encoded once with msgpack;
- a message larger than the server's ``max_payload`` (headers included) raises
  ``PayloadTooLarge`` before anything is sent, instead of the server closing the connection;
- request-reply failures become ``Unavailable`` (no responder) or ``DeadlineExceeded``;
- a subject nats-py refuses (empty, or holding whitespace) raises ``InvalidRequest``;
- a subscription handler that raises is counted and logged, rate-limited, and the
  subscription goes on;
- credentials and TLS from ``BusSecurity``; a first connection the server refuses (bad
  credentials, a certificate that does not verify) fails at once instead of retrying forever,
  and when TLS was asked for (a ``tls://`` URL or a CA file) no secret is sent in clear text.
"""

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Self

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from shared.codec import encode
from shared.config import redact_url
from shared.errors import DeadlineExceeded, InvalidRequest, PayloadTooLarge, Unavailable
from shared.logs import RateLimitedLog
from shared.security import BusSecurity

logger = logging.getLogger(__name__)

# A subscription that falls this far behind drops messages (nats-py's slow-consumer rule), so
# the busy ones (token inboxes) get room for a long burst.
_PENDING_MSGS_LIMIT = 1_000_000
_PENDING_BYTES_LIMIT = 1024 * 1024 * 1024
_MAX_SUBJECT_CHARS = 120  # a subject quoted in an error or a log line is cut to this
# The header of a message the server itself sends to a reply subject; "503": nobody was
# subscribed to the subject the request went to.
NATS_STATUS = "Status"

Handler = Callable[[Msg], Awaitable[None]]


class Bus:
    """One NATS connection shared by everything in a process."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._closed = False
        self._on_reconnected: list[Callable[[], None]] = []
        # Messages whose subscription handler raised, over every subscription (a service may
        # export it); each subscription logs at most one of them per interval.
        self.num_handler_failures = 0
        self._handler_log = RateLimitedLog(logger, level=logging.ERROR)

    def on_reconnected(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time the connection comes back after a loss (what was
        published to this process's subscriptions meanwhile is gone)."""
        self._on_reconnected.append(callback)

    def _reconnected(self) -> None:
        for callback in self._on_reconnected:
            callback()

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        url: str,
        *,
        name: str = "baton",
        connect_timeout_s: float = 5.0,
        security: BusSecurity | None = None,
    ) -> AsyncIterator[Self]:
        """Connect (retrying forever once connected; reconnects keep subscriptions) and close
        on exit. Raises ``Unavailable`` if the first connection fails, and at once if the
        server refuses it in a way no retry fixes: wrong or missing credentials, a
        certificate that does not verify, no TLS where TLS was asked for."""
        client = Client()
        bus = cls(client)

        async def on_reconnected() -> None:
            logger.info("nats reconnected")
            bus._reconnected()

        try:
            await _connect_first(
                client, url, name, connect_timeout_s, security or BusSecurity(), on_reconnected
            )
        except (OSError, nats.errors.Error, TimeoutError) as exc:
            raise Unavailable(f"cannot connect to NATS at {redact_url(url)}: {exc!r}") from exc
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
        except nats.errors.BadSubjectError as exc:
            raise _bad_subject(subject, reply) from exc
        except nats.errors.OutboundBufferLimitError as exc:
            raise Unavailable("NATS is disconnected and the outbound buffer is full") from exc
        except nats.errors.ConnectionClosedError as exc:
            raise Unavailable("NATS connection is closed") from exc
        except (RuntimeError, OSError) as exc:  # its socket closed under it, mid-reconnect
            raise Unavailable(f"NATS connection lost: {exc}") from exc

    async def request(self, subject: str, message: msgspec.Struct, *, timeout_s: float) -> bytes:
        """Send and wait for one reply's bytes. ``Unavailable`` if nobody listens on the subject,
        ``DeadlineExceeded`` if no reply comes within ``timeout_s``."""
        payload = encode(message)
        self.check_size(payload)
        try:
            msg = await self._client.request(subject, payload, timeout=timeout_s)
        except nats.errors.BadSubjectError as exc:
            raise _bad_subject(subject) from exc
        except nats.errors.NoRespondersError as exc:
            raise Unavailable(f"no responder on {subject}") from exc
        except nats.errors.TimeoutError as exc:
            raise DeadlineExceeded(f"no reply on {subject} within {timeout_s} s") from exc
        except nats.errors.ConnectionClosedError as exc:
            raise Unavailable("NATS connection is closed") from exc
        except (RuntimeError, OSError) as exc:  # its socket closed under it, mid-reconnect
            raise Unavailable(f"NATS connection lost: {exc}") from exc
        data: bytes = msg.data
        return data

    async def subscribe(self, subject: str, handler: Handler, *, queue: str = "") -> Subscription:
        """Call ``handler`` for each message, one at a time in arrival order. A handler that
        raises is counted in ``num_handler_failures`` and logged (at most one line, with its
        traceback, per subscription per interval) and the subscription goes on: one bad
        message never stops it, and a flood of them cannot flood the log. Returns once the
        server has the subscription; ``InvalidRequest`` if nats-py refuses the subject."""

        async def guarded(msg: Msg) -> None:
            try:
                await handler(msg)
            except asyncio.CancelledError:
                raise
            except Exception:
                self._handler_failed(subject, msg.subject)

        try:
            sub: Subscription = await self._client.subscribe(
                subject,
                queue=queue,
                cb=guarded,
                pending_msgs_limit=_PENDING_MSGS_LIMIT,
                pending_bytes_limit=_PENDING_BYTES_LIMIT,
            )
        except nats.errors.BadSubjectError as exc:
            raise _bad_subject(subject, queue=queue) from exc
        # Make the server know the subscription before anyone is told it exists.
        await self.flush()
        return sub

    def _handler_failed(self, subscribed: str, subject: str) -> None:
        """Count and log (rate-limited per subscription) the exception being handled. The key
        is the subject subscribed to, which the code chose; never the message's own subject,
        which a wildcard lets any sender choose."""
        self.num_handler_failures += 1
        self._handler_log.log(
            subscribed,
            "bus handler failed subject=%s num_handler_failures=%d",
            subject[:_MAX_SUBJECT_CHARS],
            self.num_handler_failures,
            exc_info=True,
        )

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


def _bad_subject(subject: str, reply: str = "", *, queue: str | None = None) -> InvalidRequest:
    """The error for a subject, reply subject or queue group that nats-py refuses (``queue``
    given: refused to subscribe)."""
    what = f"subject {subject[:_MAX_SUBJECT_CHARS]!r}"
    if reply:
        what += f" or reply subject {reply[:_MAX_SUBJECT_CHARS]!r}"
    if queue:
        what += f" or queue group {queue[:_MAX_SUBJECT_CHARS]!r}"
    rule = "non-empty, with no whitespace"
    if queue is not None:  # subscribing: nats-py checks the tokens too
        rule += ", no empty token, and wildcards only as whole tokens ('>' last)"
    return InvalidRequest(f"invalid NATS {what}: it must be {rule}")


async def _connect_first(
    client: Client,
    url: str,
    name: str,
    connect_timeout_s: float,
    security: BusSecurity,
    on_reconnected: Callable[[], Awaitable[None]],
) -> None:
    """``client.connect`` with Baton's options; raises the server's refusal as soon as one
    comes (nats-py would retry it forever) and closes the client on any failure."""
    refusals: asyncio.Queue[Exception] = asyncio.Queue()

    async def on_error(exc: Exception) -> None:
        if not client.is_connected and _is_refusal(exc):
            refusals.put_nowait(exc)
        await _log_error(exc)

    connecting = asyncio.create_task(
        client.connect(
            url,
            name=name,
            connect_timeout=int(max(1, connect_timeout_s)),
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            allow_reconnect=True,
            error_cb=on_error,
            disconnected_cb=_log_disconnected,
            reconnected_cb=on_reconnected,
            pending_size=64 * 1024 * 1024,
            **_auth_options(client, url, security),
        ),
        name=f"nats connect {name}",
    )
    refused = asyncio.create_task(refusals.get(), name=f"nats refusal {name}")
    try:
        await asyncio.wait([connecting, refused], return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done():
            raise refused.result()
        connecting.result()
        if _wants_tls(url, security) and not _is_tls(client):
            raise nats.errors.SecureConnWantedError()
    except BaseException:
        connecting.cancel()
        await asyncio.wait([connecting])
        await client.close()
        raise
    finally:
        refused.cancel()


def _auth_options(client: Client, url: str, security: BusSecurity) -> dict[str, Any]:
    """nats-py's keyword arguments for these credentials and TLS settings. A password or token
    is handed over by a callback that refuses (nats-py's ``SecureConnWantedError``) when TLS
    was asked for and the server did not switch to it, so that it never crosses in clear."""
    wants_tls = _wants_tls(url, security)

    def secret(value: str) -> Callable[[], str]:
        def reveal() -> str:
            if wants_tls and not _is_tls(client):
                raise nats.errors.SecureConnWantedError()
            return value

        return reveal

    options: dict[str, Any] = {}
    if security.nats_user:
        options["user"] = security.nats_user
        options["password"] = secret(security.nats_password)
    if security.nats_token:
        options["token"] = secret(security.nats_token)
    if security.nats_creds:
        options["user_credentials"] = security.nats_creds
    if wants_tls:
        options["tls"] = security.ssl_context()
    return options


def _wants_tls(url: str, security: BusSecurity) -> bool:
    return url.startswith("tls://") or security.has_tls_files


def _is_tls(client: Client) -> bool:
    # nats-py switches to TLS exactly when the server's INFO says so; it keeps INFO private.
    return bool(client._server_info.get("tls_required"))


def _is_refusal(exc: Exception) -> bool:
    """Whether the server refused us for a reason that retrying will not change."""
    if isinstance(
        exc,
        ssl.SSLError
        | nats.errors.AuthorizationError
        | nats.errors.SecureConnWantedError
        | nats.errors.InvalidUserCredentialsError,
    ):
        return True
    text = str(exc).lower()
    return isinstance(exc, nats.errors.Error) and (
        "authorization violation" in text or "authentication" in text
    )


async def _log_error(exc: Exception) -> None:
    logger.warning("nats error error=%r", exc)


async def _log_disconnected() -> None:
    logger.warning("nats disconnected")
