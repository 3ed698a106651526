"""Retrying etcd calls: which errors mean etcd is unreachable, jittered backoff between tries,
quiet logging of an outage's retries, and stopping the tasks that retry."""

import asyncio
import logging
import random
from typing import Final

import grpc.aio  # type: ignore[import-untyped]  # no grpc stubs in the venv; only the error type is used
from etcd3aio import EtcdError

logger = logging.getLogger(__name__)

BACKOFF_MIN_S: Final = 0.1
BACKOFF_MAX_S: Final = 2.0
# What etcd3aio and grpc raise for an etcd that is down, slow or refusing.
ETCD_FAILURES: Final = (EtcdError, grpc.aio.AioRpcError, TimeoutError)


class Backoff:
    """Jittered exponential delay between retries, capped so recovery stays prompt."""

    def __init__(self, max_s: float = BACKOFF_MAX_S) -> None:
        self._max_s = max(max_s, BACKOFF_MIN_S)
        self._delay_s = BACKOFF_MIN_S

    def reset(self) -> None:
        self._delay_s = BACKOFF_MIN_S

    def next_s(self) -> float:
        delay_s = self._delay_s * random.uniform(0.5, 1.0)  # jitter: workers retry apart
        self._delay_s = min(self._delay_s * 2, self._max_s)
        return delay_s


async def stop_tasks(tasks: list[asyncio.Task[None]]) -> list[BaseException]:
    """Cancel ``tasks``, wait for them and return what they failed with (not cancellations)."""
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
    return [exc for t in tasks if not t.cancelled() and (exc := t.exception()) is not None]


def describe(exc: BaseException) -> str:
    """One line for a log or an error message; grpc's own repr spans five."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name} {exc.details()}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def log_retry(num_failures: int, message: str, *args: object) -> None:
    """Warn on the first failure of an outage; the retries after it go to DEBUG."""
    logger.log(logging.WARNING if num_failures == 1 else logging.DEBUG, message, *args)
