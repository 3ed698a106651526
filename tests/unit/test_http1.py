"""The load client's lean HTTP/1.1: responses parsed as they arrive, in any split, and
keep-alive connections to a real aiohttp server."""

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web

from services.bench import http1

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SSE = b'data: {"a": 1}\n\ndata: {"b": 2}\n\ndata: [DONE]\n\n'


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


_LOOP = asyncio.new_event_loop()  # only makes the futures; never run


@pytest.fixture(scope="module", autouse=True)
def _close_loop():
    yield
    _LOOP.close()


def parse(raw: bytes, step: int) -> tuple[http1.Response, list[bytes]]:
    """Feed ``raw`` ``step`` bytes at a time."""
    lines: list[bytes] = []
    response = http1.Response(_LOOP, lines.append)
    for i in range(0, len(raw), step):
        response.feed(raw[i : i + step])
    return response, lines


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_a_chunked_stream_comes_line_by_line_in_any_split(step):
    head = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
    )
    raw = head + chunked(SSE[:10], SSE[10:31], SSE[31:])
    response, lines = parse(raw, step)
    assert response.done.done()
    assert response.status == 200
    assert response.keep_alive
    assert [line for line in lines if line] == [
        b'data: {"a": 1}',
        b'data: {"b": 2}',
        b"data: [DONE]",
    ]


@pytest.mark.parametrize("step", [1, 5, 1000])
def test_a_refusal_keeps_its_body_and_headers(step):
    body = b'{"error": {"message": "busy"}}'
    raw = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    response, lines = parse(raw, step)
    assert response.done.done()
    assert (response.status, response.headers["retry-after"], bytes(response.body)) == (
        429,
        "2",
        body,
    )
    assert lines == []


def test_trailers_close_and_an_empty_body():
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"x\n")[:-2]
    raw += b"X-Trailer: 1\r\n\r\n"
    response, lines = parse(raw, 4)
    assert response.done.done()
    assert lines == [b"x"]
    response, _ = parse(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n", 100)
    assert response.done.done()
    assert not response.keep_alive


def test_a_body_to_the_end_of_the_connection():
    response, lines = parse(b"HTTP/1.1 200 OK\r\n\r\ndata: 1\ndata: 2", 3)
    assert not response.done.done()
    response.eof()
    assert response.done.done()
    assert lines == [b"data: 1", b"data: 2"]
    assert not response.keep_alive


@pytest.mark.parametrize(
    "raw",
    [
        b"SPDY 200 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxyz",
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab",  # bytes after the response
    ],
)
def test_a_malformed_response_is_a_protocol_error(raw):
    with pytest.raises(http1.ProtocolError):
        parse(raw, 1000)


def test_a_response_cut_short_is_a_connection_error():
    response, _ = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", 100)
    with pytest.raises(ConnectionResetError):
        response.eof()


def test_only_plain_http():
    with pytest.raises(ValueError, match="plain http"):
        http1.Client("https://example.com")
    client = http1.Client("http://127.0.0.1:9/prefix/")
    request = client.post_bytes("/v1/completions", b"{}")
    assert request.startswith(b"POST /prefix/v1/completions HTTP/1.1\r\nHost: 127.0.0.1:9\r\n")
    assert request.endswith(
        b"Content-Length: 2\r\nAccept: text/event-stream, application/json\r\n\r\n{}"
    )


async def serve(routes: dict[str, Handler]) -> tuple[web.AppRunner, int]:
    """A real aiohttp server on a free loopback port, answering POSTs to ``routes``."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_post(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


async def test_a_real_server_streams_refuses_and_keeps_the_connection():
    peers: list[object] = []

    async def stream(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername"))
        if (await request.json())["refuse"]:
            return web.json_response({"error": "busy"}, status=429, headers={"Retry-After": "1"})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for part in (SSE[:12], SSE[12:]):
            await response.write(part)
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    async def close(request: web.Request) -> web.Response:
        return web.Response(text="bye", status=503, headers={"Connection": "close"})

    runner, port = await serve({"/v1/completions": stream, "/close": close})
    client = http1.Client(f"http://127.0.0.1:{port}")
    loop = asyncio.get_running_loop()
    try:
        opened: list[bool] = []
        for refuse in (False, True, False):
            lines: list[bytes] = []
            response = http1.Response(loop, lines.append)
            body = b'{"refuse": %s}' % (b"true" if refuse else b"false")
            opened.append(
                await asyncio.wait_for(
                    client.send(client.post_bytes("/v1/completions", body), response), 10
                )
            )
            if refuse:
                assert (response.status, response.headers["retry-after"]) == (429, "1")
                assert bytes(response.body) == b'{"error": "busy"}'
            else:
                assert response.status == 200
                assert b"data: [DONE]" in lines
        assert len(set(peers)) == 1  # one keep-alive connection for all three
        assert opened == [True, False, False]
        response = http1.Response(loop, lambda line: None)
        await asyncio.wait_for(client.send(client.post_bytes("/close", b"{}"), response), 10)
        assert (response.status, bytes(response.body), response.keep_alive) == (503, b"bye", False)
        response = http1.Response(loop, lambda line: None)
        assert await asyncio.wait_for(
            client.send(client.post_bytes("/v1/completions", b'{"refuse": true}'), response), 10
        )
        assert response.status == 429
        assert len(set(peers)) == 2  # a new connection: the server closed the first
    finally:
        client.close()
        await runner.cleanup()


async def test_connects_from_the_source_address_it_is_given():
    peers: list[str] = []

    async def ok(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername")[0])
        return web.Response(text="ok")

    runner, port = await serve({"/ok": ok})
    loop = asyncio.get_running_loop()
    try:
        for source in ("127.0.0.2", "127.0.0.3"):
            client = http1.Client(
                f"http://127.0.0.1:{port}", local_addr=(source, 0), connect_timeout_s=10.0
            )
            lines: list[bytes] = []
            response = http1.Response(loop, lines.append)
            try:
                await asyncio.wait_for(client.send(client.post_bytes("/ok", b"{}"), response), 10)
            finally:
                client.close()
            assert (response.status, lines) == (200, [b"ok"])
        assert peers == ["127.0.0.2", "127.0.0.3"]
    finally:
        await runner.cleanup()
