"""The trims of what aiohttp keeps per connection (``conn_memory``), checked against the
installed aiohttp: each rests on how aiohttp uses a private field, and an upgrade that uses it
otherwise must fail here, not in production."""

import asyncio
import inspect
import re

import aiohttp
import pytest
from aiohttp import StreamReader, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.web_protocol import RequestHandler

from services.frontend.conn_memory import (
    MessageQueue,
    release_body_buffer,
    release_request_cache,
)
from services.frontend.early_shed import EarlyShed, EarlyShedRunner


def test_the_installed_aiohttp_uses_its_message_queue_as_the_list_here_allows():
    # The connection's queue of parsed requests is a list with popleft, not a deque: an
    # aiohttp that used any other deque method on it would break there.
    source = inspect.getsource(RequestHandler)
    used = set(re.findall(r"self\._messages\.(\w+)", source))
    assert used <= {"append", "popleft"}, used
    queue = MessageQueue()
    queue.append(1)
    queue.append(2)
    assert (len(queue), queue.popleft(), queue.popleft(), bool(queue)) == (2, 1, 2, False)


async def test_a_body_read_to_its_end_gives_up_its_buffer_and_reads_as_before():
    reader = StreamReader(BaseProtocol(asyncio.get_running_loop()), 2**16)
    reader.feed_data(b'{"model": "m"}')
    release_body_buffer(reader)  # not at its end: kept
    assert len(reader._buffer) == 1
    reader.feed_eof()
    assert await reader.readany() == b'{"model": "m"}'
    release_body_buffer(reader)
    assert reader._buffer == ()
    # What aiohttp and a handler may still do with a reader at its end.
    assert (await reader.readany(), await reader.read(), await reader.readchunk()) == (
        b"",
        b"",
        (b"", False),
    )
    assert reader.is_eof()
    assert reader.at_eof()
    called: list[str] = []
    reader.on_eof(lambda: called.append("at once"))  # after the end: run, not kept
    assert called == ["at once"]
    other = StreamReader(BaseProtocol(asyncio.get_running_loop()), 2**16)
    other.feed_eof()
    release_body_buffer(other)
    # What they keep is shared, and refuses what a reader at its end never takes.
    assert other._eof_callbacks is reader._eof_callbacks
    assert other._timer is reader._timer
    with pytest.raises(RuntimeError):
        reader._eof_callbacks.append(print)
    reader.set_exception(RuntimeError("after the response"))  # aiohttp's last call on it
    # Nothing can be added to it: aiohttp refuses data after the end.
    source = inspect.getsource(StreamReader.feed_data)
    assert 'assert not self._eof, "feed_data after feed_eof"' in source


async def test_an_open_stream_holds_no_idle_timer_and_an_idle_connection_still_closes():
    seen: dict[str, object] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        protocol = request.protocol
        seen["protocol"] = protocol
        seen["timer_while_handled"] = protocol._keepalive_handle
        assert (request.path, request.headers["Content-Length"]) == ("/v1/completions", "2")
        response = web.StreamResponse()
        await response.prepare(request)
        release_request_cache(request)
        seen["cache_after_release"] = dict(request._cache)
        # Computed again when asked; what a clone set cannot be, and is kept.
        seen["asked_again"] = (request.path, request.keep_alive, request.headers["Host"])
        clone = request.clone(remote="10.0.0.1")
        release_request_cache(clone)
        seen["clone_remote"] = clone.remote
        await response.write(b"data: x\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    early = EarlyShed(lambda: False, lambda: b"", max_header_bytes=16384)
    runner = EarlyShedRunner(app, early, keepalive_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{port}/v1/completions", data=b"{}") as r:
                assert await r.read() == b"data: x\n\n"
            protocol = seen["protocol"]
            assert isinstance(protocol, RequestHandler)
            assert seen["timer_while_handled"] is None
            assert seen["cache_after_release"] == {}
            assert seen["asked_again"] == ("/v1/completions", True, f"127.0.0.1:{port}")
            assert seen["clone_remote"] == "10.0.0.1"
            # After the response aiohttp starts the idle timer again, and it closes the
            # connection once it has been idle that long.
            await asyncio.sleep(0.05)
            assert protocol._keepalive_handle is not None
            for _ in range(40):
                await asyncio.sleep(0.05)
                if protocol.transport is None:
                    break
            assert protocol.transport is None
    finally:
        await runner.cleanup()
