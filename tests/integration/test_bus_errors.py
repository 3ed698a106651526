"""The bus's error edges against a real nats-server: handlers that raise, subjects nats-py
refuses."""

import asyncio
import logging

import pytest
from nats.aio.msg import Msg

from proto import subjects
from proto.messages import AbortRequest, RequestId
from shared.bus import Bus
from shared.errors import InvalidRequest

NUM_FAILING = 500


async def test_a_flood_of_failing_messages_is_counted_not_logged_each(
    nats_server, namespace, caplog
):
    subject = subjects.worker_inbox(namespace, "w1")
    done = asyncio.Event()

    async def handler(msg: Msg) -> None:
        if msg.data == b"ok":
            done.set()
            return
        raise ValueError("handler bug")

    with caplog.at_level(logging.ERROR, logger="shared.bus"):
        async with Bus.connect(nats_server.url) as bus:
            await bus.subscribe(subject, handler)
            for _ in range(NUM_FAILING):
                await bus.publish_bytes(subject, b"boom")
            # Handled in arrival order: once this one is, every failing one was.
            await bus.publish_bytes(subject, b"ok")
            async with asyncio.timeout(10):
                await done.wait()
            assert bus.num_handler_failures == NUM_FAILING
    failures = [r for r in caplog.records if "bus handler failed" in r.getMessage()]
    assert 1 <= len(failures) <= 2  # the first (one more only if the test took > 10 s)
    assert failures[0].exc_info is not None  # the first keeps its traceback
    assert failures[0].exc_info[0] is ValueError


@pytest.mark.parametrize("subject", ["", " ", "a b", "a\tb", "a\r\nPUB x 1"])
async def test_a_subject_nats_refuses_raises_invalid_request(nats_server, namespace, subject):
    message = AbortRequest(request_id=RequestId("r"))
    good = subjects.worker_inbox(namespace, "w1")
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_msg(msg: Msg) -> None:
        await received.put(msg.data)

    async with Bus.connect(nats_server.url) as bus:
        await bus.subscribe(good, on_msg)
        with pytest.raises(InvalidRequest, match="invalid NATS subject"):
            await bus.publish(subject, message)
        with pytest.raises(InvalidRequest, match="invalid NATS subject"):
            await bus.publish_bytes(subject, b"x")
        with pytest.raises(InvalidRequest, match="invalid NATS subject"):
            await bus.request(subject, message, timeout_s=1)
        with pytest.raises(InvalidRequest, match=r"invalid NATS subject .* reply subject"):
            await bus.publish_bytes(good, b"x", reply=subject or "a b")
        with pytest.raises(InvalidRequest, match="invalid NATS subject"):
            await bus.subscribe(subject, on_msg)
        # Refused before anything was sent: the connection carries on.
        await bus.publish_bytes(good, b"after")
        async with asyncio.timeout(5):
            assert await received.get() == b"after"
        assert bus.is_connected


async def test_a_misplaced_wildcard_is_refused_to_subscribe(nats_server):
    async def on_msg(msg: Msg) -> None:
        return None

    async with Bus.connect(nats_server.url) as bus:
        for subject in ("a..b", "a.>.b", "a.b*"):
            with pytest.raises(InvalidRequest, match="wildcards only as whole tokens"):
                await bus.subscribe(subject, on_msg)
