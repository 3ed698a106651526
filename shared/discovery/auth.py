"""etcd user authentication: one token for every call of a client, kept valid.

etcd's Auth/Authenticate RPC trades a user and password for a token that each call carries in
its ``token`` metadata; etcd3aio sends it once told (``Etcd3Client.set_token``). A token lapses:
a simple token after ``--auth-token-ttl`` (300 s) unused, and every one when etcd restarts.
So the login authenticates again on a timer and, sooner, whenever a call was refused for its
token; the calls that failed meanwhile are retried by their owners (keepalives, watches).
"""

import asyncio
import contextlib
import logging
from typing import Final, cast

import grpc  # type: ignore[import-untyped]  # no grpc stubs in the venv; only status codes are used
import grpc.aio  # type: ignore[import-untyped]
from etcd3aio import Etcd3Client, EtcdUnauthenticatedError
from etcd3aio.auth import AuthService

from shared.discovery.retry import ETCD_FAILURES, Backoff, describe, log_retry
from shared.errors import Unavailable

logger = logging.getLogger(__name__)

RENEW_S: Final = 60.0  # well inside etcd's default token TTL of 300 s


def is_token_refused(exc: BaseException) -> bool:
    """Whether etcd refused a call for its token (missing, lapsed, or from before a restart)."""
    if isinstance(exc, EtcdUnauthenticatedError):
        return True
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAUTHENTICATED


class EtcdLogin:
    """Authenticates one client as ``user`` and keeps its token valid while ``keep_valid``
    runs (a task the ``Discovery`` owns)."""

    def __init__(
        self,
        client: Etcd3Client,
        url: str,
        user: str,
        password: str,
        *,
        call_timeout_s: float,
        renew_s: float = RENEW_S,
    ) -> None:
        self._client = client
        self._url = url
        self.user: Final = user
        self._password = password
        self._call_timeout_s = call_timeout_s
        self._renew_s = renew_s
        self._wake = asyncio.Event()

    async def authenticate(self) -> None:
        """Get a token and give it to every service of the client. ``Unavailable`` if etcd
        refuses the user or password, has auth disabled, or does not answer."""
        auth = cast(AuthService, self._client.auth)
        try:
            response = await auth.authenticate(
                self.user, self._password, timeout=self._call_timeout_s
            )
        except ETCD_FAILURES as exc:
            raise Unavailable(
                f"etcd at {self._url} did not authenticate user {self.user!r}: {describe(exc)}"
            ) from exc
        self._client.set_token(str(response.token))

    def renew_soon(self) -> None:
        """Authenticate again now: a call was refused for its token."""
        self._wake.set()

    async def keep_valid(self) -> None:
        """Authenticate every ``renew_s``, and at once after ``renew_soon``; until cancelled.
        Failures are retried with backoff (etcd down, or a password changed under us)."""
        backoff = Backoff()
        delay_s = self._renew_s
        num_failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.authenticate()
            except Unavailable as exc:
                num_failures += 1
                log_retry(num_failures, "etcd authentication failed error=%s", exc)
                delay_s = backoff.next_s()
                continue
            if num_failures:
                logger.info("etcd authenticated again user=%s", self.user)
                num_failures = 0
            backoff.reset()
            delay_s = self._renew_s
