"""While a frontend's loop lags, a plain completion request is answered 429 by its
connection, before aiohttp reads it; while the early check sheds, the connection runs it on
the request's bytes. The rest take the usual path, with the same answers."""

import asyncio
import json

import aiohttp
import pytest

from tests.metrics import metric

MODEL = "baton-sim"
SLO = ("--slo-ttft-ms", "2000", "--slo-tpot-ms", "100")
# A bound no loop meets: every frontend process reads itself overloaded from its first tick.
ALWAYS_LAGGING = ("--max-loop-lag-ms", "0.001")
BODY = json.dumps(
    {"model": MODEL, "prompt": [10, 11, 12], "max_tokens": 3, "ignore_eos": True}
).encode()


def raw_request(*headers: str, body: bytes = BODY, path: str = "/v1/completions") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: baton", "Content-Type: application/json"]
    if not any(h.lower().startswith("transfer-encoding") for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join([*lines, *headers]) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body: status, headers (lower-case), body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    return status, headers, body


def assert_shed(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 429
    assert headers["retry-after"] == "1"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("rate_limit_error", 429)
    assert "overloaded" in error["message"]


@pytest.mark.timeout(120)
async def test_a_lagging_frontend_sheds_plain_requests_on_their_connection(start_cluster):
    cluster = await start_cluster(
        num_workers=1, worker_args=SLO, frontend_args=(*SLO, *ALWAYS_LAGGING)
    )
    host, port = cluster.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for _ in range(5):  # one keep-alive connection, one whole request a write
            writer.write(raw_request())
            assert_shed(*await read_response(reader))
        # Not JSON: nothing reads the body of a shed request, here or in the handler.
        writer.write(raw_request(body=b"not json"))
        assert_shed(*await read_response(reader))
        # A chunked body is aiohttp's to read: the handler sheds it, with the same answer.
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
        writer.write(raw_request("Transfer-Encoding: chunked", body=chunked))
        assert_shed(*await read_response(reader))
        # High priority is never shed for the lag: an idle worker serves it.
        writer.write(raw_request("X-Baton-Priority: high"))
        status, _, body = await read_response(reader)
        assert status == 200
        assert json.loads(body)["usage"]["completion_tokens"] == 3
        # Pipelined behind a request in progress, a request waits its turn (aiohttp's).
        writer.write(raw_request("X-Baton-Priority: high"))
        await writer.drain()
        writer.write(raw_request())
        assert (await read_response(reader))[0] == 200
        assert_shed(*await read_response(reader))
        # Right after aiohttp's own answers, the connection sheds early again. The client's
        # "close" is kept: the answer says so, and the connection ends.
        writer.write(raw_request("Connection: close"))
        status, headers, body = await read_response(reader)
        assert_shed(status, headers, body)
        assert headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()

    async with aiohttp.ClientSession() as session:
        early = await metric(
            cluster.url, "baton_frontend_overload_sheds_total", session, where="connection"
        )
        late = await metric(
            cluster.url, "baton_frontend_overload_sheds_total", session, where="handler"
        )
        # The lag it sheds by is on /metrics: late ticks made it more than 0 (it never
        # decays to exactly 0 within a test), one series for the one process.
        lag = await metric(cluster.url, "baton_frontend_loop_lag_seconds", session)
        # And the fraction it sheds: above 0 (a bound of 1 us reads any late tick as far past
        # it; the ticks on time since may have begun to lower it).
        fraction = await metric(cluster.url, "baton_frontend_lag_shed_fraction", session)
        async with session.get(f"{cluster.url}/v1/models") as resp:  # other paths: as ever
            assert resp.status == 200
        async with session.get(f"{cluster.url}/metrics") as resp:
            page = await resp.text()
    assert (early, late) == (7, 2)
    assert lag > 0
    assert 0 < fraction <= 1
    assert page.count("baton_frontend_loop_lag_seconds{pid=") == 1


async def test_with_api_keys_only_a_valid_key_is_shed_early(start_cluster):
    cluster = await start_cluster(
        num_workers=1, worker_args=SLO, frontend_args=(*SLO, *ALWAYS_LAGGING, "--api-key", "k1")
    )
    host, port = cluster.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw_request())  # no key: the 401 comes first, as without the lag
        status, headers, _ = await read_response(reader)
        assert status == 401
        assert headers["www-authenticate"].startswith("Bearer")
        writer.write(raw_request("Authorization: Bearer wrong"))
        assert (await read_response(reader))[0] == 401
        writer.write(raw_request("Authorization: Bearer k1"))
        assert_shed(*await read_response(reader))
    finally:
        writer.close()
    early = await metric(cluster.url, "baton_frontend_overload_sheds_total", where="connection")
    assert early == 1


# 1 ns: gone before any check runs, so the early check sheds whatever the workers report.
TIGHT = "X-Baton-SLO-TTFT-Ms: 0.000001"
CHAT_BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
).encode()


def assert_checked_shed(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 429
    assert int(headers["retry-after"]) >= 1
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", 429)
    assert "from a first token" in error["message"]


@pytest.mark.timeout(120)
async def test_while_the_early_check_sheds_a_connection_runs_it_first(start_cluster):
    cluster = await start_cluster(num_workers=1, worker_args=SLO, frontend_args=SLO)
    host, port = cluster.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        # The first through aiohttp; its shed turns the check on for the connections.
        for _ in range(3):
            writer.write(raw_request(TIGHT))
            assert_checked_shed(*await read_response(reader))
        # What the check cannot read goes on to aiohttp, which says what is wrong.
        writer.write(raw_request(TIGHT, body=b"not json"))
        status, _, body = await read_response(reader)
        assert status == 400
        assert "not valid JSON" in json.loads(body)["error"]["message"]
        writer.write(raw_request(TIGHT, body=CHAT_BODY, path="/v1/chat/completions"))
        assert_checked_shed(*await read_response(reader))
        # One the check passes goes on to aiohttp and is served; the check is off again,
        # so the next shed is the handler's.
        writer.write(raw_request())
        status, _, body = await read_response(reader)
        assert status == 200
        assert json.loads(body)["usage"]["completion_tokens"] == 3
        writer.write(raw_request(TIGHT))
        assert_checked_shed(*await read_response(reader))
    finally:
        writer.close()

    async with aiohttp.ClientSession() as session:
        on_connection = await metric(
            cluster.url, "baton_frontend_connection_capacity_sheds_total", session
        )
        shed = await metric(
            cluster.url, "baton_frontend_shed_seconds_count", session, stage="frontend"
        )
        by_model = await metric(
            cluster.url, "baton_frontend_goodput_requests_total", session, outcome="shed"
        )
        answered = await metric(cluster.url, "baton_frontend_requests_total", session, status="429")
    assert on_connection == 3  # the second, the third and the chat request
    assert shed == by_model == answered == 5
