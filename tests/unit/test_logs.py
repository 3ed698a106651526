"""RateLimitedLog and BadMessages: a flood of N bad messages logs O(1) lines per interval."""

import logging

import msgspec

from proto.messages import KVRelease
from shared.codec import encode, worker_inbound_decoder
from shared.errors import InvalidRequest
from shared.logs import BadMessages, RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_rate_limited_log_logs_first_then_one_summary_per_interval_per_key(caplog):
    clock = Clock()
    log = RateLimitedLog(logging.getLogger("t"), interval_s=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="t"):
        for _ in range(1000):
            log.log("a", "bad a n=%d", 1)
            log.log("b", "bad b")
        clock.now_s += 10.0
        log.log("a", "bad a n=%d", 2)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["bad a n=1 suppressed=0", "bad b suppressed=0", "bad a n=2 suppressed=999"]
    assert log.num_suppressed == 999 + 999


def test_bad_messages_counts_and_returns_the_error_to_reply_with(caplog):
    bad = BadMessages(RateLimitedLog(logging.getLogger("t")), "worker message")
    with caplog.at_level(logging.WARNING, logger="t"):
        errors = [bad.decode_or_error(worker_inbound_decoder, b"\xc1" * n, "s") for n in range(50)]
        good = bad.decode(worker_inbound_decoder, encode(KVRelease(request_id="r")), "s")
    assert all(isinstance(e, InvalidRequest) for e in errors)
    assert "malformed worker message" in str(errors[1])
    assert good == KVRelease(request_id="r")
    assert bad.num_bad == 50
    assert len(caplog.records) == 1  # the first; the other 49 are counted, not logged
    assert bad.decode(worker_inbound_decoder, msgspec.msgpack.encode([1]), "s") is None
    assert bad.num_bad == 51


def test_rate_limited_log_keeps_the_traceback_on_the_lines_it_logs(caplog):
    log = RateLimitedLog(logging.getLogger("t"), level=logging.ERROR)
    with caplog.at_level(logging.ERROR, logger="t"):
        for _ in range(100):
            try:
                raise KeyError("k")
            except KeyError:
                log.log("handler", "failed", exc_info=True)
    assert len(caplog.records) == 1
    exc_info = caplog.records[0].exc_info
    assert exc_info is not None
    assert exc_info[0] is KeyError
    assert log.num_suppressed == 99
