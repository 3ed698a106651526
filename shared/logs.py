"""Logging that stays bounded under a flood: warnings rate-limited per key, and the decode of
bus messages that counts and warns about the ones that do not decode.

A subscriber that logs one line per bad message lets anyone who can publish on its subject
fill its disk and spend its event loop on formatting. ``RateLimitedLog`` logs the first
occurrence of each key at once, then at most one line per ``interval_s`` per key, which says
how many were left out since the last line. Keys must come from a small fixed set (what went
wrong, never a subject or an id from the message): ``max_keys`` bounds them anyway.

``BadMessages`` is the "decode or warn" step every bus handler shares: decode against the
subscriber's typed decoder; on failure count it, rate-limit-log it and return the
``InvalidRequest`` a request-reply handler sends back.
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import msgspec

from shared.errors import InvalidRequest

T = TypeVar("T")

_MAX_SUBJECT_CHARS = 120  # a subject in a log line is cut to this (a wildcard lets any through)
_MAX_ERROR_CHARS = 200


@dataclass(slots=True)
class _KeyState:
    last_logged_s: float
    num_suppressed: int = 0


class RateLimitedLog:
    """At most one line per ``interval_s`` per key: the first occurrence at once, then the next
    one due with ``suppressed=<n>`` (how many were not logged since the previous line)."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval_s: float = 10.0,
        level: int = logging.WARNING,
        max_keys: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._logger = logger
        self._interval_s = interval_s
        self._level = level
        self._max_keys = max_keys
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}
        self.num_suppressed = 0  # in all, over every key

    def log(self, key: str, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log ``msg % args`` under ``key`` unless that key logged within the interval;
        whether it was logged. ``exc_info``: with the traceback of the exception being
        handled (only on the lines logged, so a flood formats none of the others)."""
        now_s = self._clock()
        state = self._keys.get(key)
        if state is not None and now_s - state.last_logged_s < self._interval_s:
            state.num_suppressed += 1
            self.num_suppressed += 1
            return False
        suppressed = 0
        if state is None:
            if len(self._keys) >= self._max_keys:
                self._keys.clear()  # a caller broke the fixed-keys rule: stay bounded
            self._keys[key] = _KeyState(now_s)
        else:
            suppressed, state.num_suppressed, state.last_logged_s = state.num_suppressed, 0, now_s
        if self._logger.isEnabledFor(self._level):
            line = msg + " suppressed=%d"
            self._logger.log(self._level, line, *args, suppressed, exc_info=exc_info)
        return True


class BadMessages:
    """Decodes one subscriber's messages and keeps the bad ones bounded: counted in
    ``num_bad``, logged through a ``RateLimitedLog`` under ``what``."""

    def __init__(self, log: RateLimitedLog, what: str) -> None:
        self._log = log
        self._what = what
        self.num_bad = 0

    def decode(self, decoder: msgspec.msgpack.Decoder[T], data: bytes, subject: str) -> T | None:
        """The message, or None (counted and logged) when it does not decode."""
        result = self.decode_or_error(decoder, data, subject)
        return None if isinstance(result, InvalidRequest) else result

    def decode_or_error(
        self, decoder: msgspec.msgpack.Decoder[T], data: bytes, subject: str
    ) -> T | InvalidRequest:
        """The message, or the ``InvalidRequest`` to answer it with (counted and logged)."""
        try:
            return decoder.decode(data)
        except msgspec.DecodeError as exc:
            return self.reject(subject, len(data), str(exc))

    def reject(self, subject: str, size_bytes: int, reason: str) -> InvalidRequest:
        """Count and log a message refused after decoding (a value no sender would send)."""
        self.num_bad += 1
        reason = reason[:_MAX_ERROR_CHARS]
        self._log.log(
            self._what,
            "bad %s subject=%s size_bytes=%d error=%s num_bad=%d",
            self._what,
            subject[:_MAX_SUBJECT_CHARS],
            size_bytes,
            reason,
            self.num_bad,
        )
        return InvalidRequest(f"malformed {self._what}: {reason}")
