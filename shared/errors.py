"""Baton's error tree; one class per HTTP status and per ``ErrorCode`` on the wire.

```
ServingError
 ├─ InvalidRequest     400  prompt too long, bad sampling params, malformed message
 ├─ NotFound           404  unknown model
 ├─ Overloaded         503  queue full / no KV capacity / no worker can take it
 │   └─ Shed           429  no worker can meet the request's objectives (shed early)
 ├─ Unavailable        503  NATS, etcd or a peer unreachable
 ├─ DeadlineExceeded   504
 ├─ Cancelled          499  client went away
 ├─ EngineError        500  engine failed a step
 └─ PayloadTooLarge    500  a bus message over the server's max_payload (a bug, never sent)
```
Errors cross the wire as ``ErrorReply(code, message)`` and are raised again as the same class.
"""

from typing import ClassVar

from proto.messages import ErrorCode, ErrorReply


class ServingError(Exception):
    """Base of every error Baton raises on purpose."""

    code: ClassVar[ErrorCode] = ErrorCode.ENGINE_ERROR
    http_status: ClassVar[int] = 500
    openai_type: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def to_reply(self) -> ErrorReply:
        return ErrorReply(code=self.code, message=self.message, retry_after_s=self.retry_after_s)


class InvalidRequest(ServingError):
    code = ErrorCode.INVALID_REQUEST
    http_status = 400
    openai_type = "invalid_request_error"


class NotFound(ServingError):
    code = ErrorCode.NOT_FOUND
    http_status = 404
    openai_type = "not_found_error"


class Overloaded(ServingError):
    code = ErrorCode.OVERLOADED
    http_status = 503
    openai_type = "overloaded_error"


class Shed(Overloaded):
    """The request would miss its time-to-first-token objective everywhere, so it is answered
    now rather than served late; ``retry_after_s`` says when capacity is likely back."""

    code = ErrorCode.SHED
    http_status = 429
    openai_type = "rate_limit_error"
    stage: ClassVar[str] = "worker"  # where it was shed (a frontend refines this)


class Unavailable(ServingError):
    code = ErrorCode.UNAVAILABLE
    http_status = 503
    openai_type = "service_unavailable_error"


class DeadlineExceeded(ServingError):
    code = ErrorCode.DEADLINE_EXCEEDED
    http_status = 504
    openai_type = "timeout_error"


class Cancelled(ServingError):
    code = ErrorCode.CANCELLED
    http_status = 499
    openai_type = "cancelled"


class EngineError(ServingError):
    code = ErrorCode.ENGINE_ERROR
    http_status = 500
    openai_type = "internal_error"


class PayloadTooLarge(ServingError):
    """A message that would exceed the NATS server's max_payload; refused before sending."""

    code = ErrorCode.ENGINE_ERROR
    http_status = 500
    openai_type = "internal_error"

    def __init__(self, size_bytes: int, max_payload_bytes: int) -> None:
        super().__init__(
            f"message of {size_bytes} bytes exceeds the bus max_payload of {max_payload_bytes}"
        )
        self.size_bytes = size_bytes
        self.max_payload_bytes = max_payload_bytes


_BY_CODE: dict[ErrorCode, type[ServingError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        NotFound,
        Overloaded,
        Shed,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        EngineError,
    )
}


def from_reply(reply: ErrorReply) -> ServingError:
    """Rebuild the exception an ``ErrorReply`` stands for."""
    cls = _BY_CODE.get(reply.code, EngineError)
    return cls(reply.message, retry_after_s=reply.retry_after_s)
