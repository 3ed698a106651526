"""The frontend at scale: several processes on one port, bursts queued rather than refused,
and clients that stop reading."""

import asyncio
import json
import signal
import socket

import aiohttp
import psutil

MODEL = "baton-sim"


def _body(content: str, max_tokens: int, stream: bool = False) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


async def _ready_ids(url: str, polls: int) -> set[str]:
    """The frontend ids that answered /ready, over ``polls`` new connections."""
    seen: set[str] = set()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(polls):
            async with session.get(f"{url}/ready") as resp:
                body = await resp.json()
                if body["ready"]:
                    seen.add(body["frontend_id"])
    return seen


async def test_frontend_processes_share_one_port_and_one_is_restarted(start_cluster):
    cluster = await start_cluster(num_workers=1, num_frontends=2)
    parent = psutil.Process(cluster.frontend.pid)
    children = parent.children()
    assert len(children) == 2
    # The kernel spreads new connections over both processes.
    first_ids = await _ready_ids(cluster.url, 40)
    assert len(first_ids) == 2
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def complete(i: int) -> int:
            async with session.post(
                f"{cluster.api}/chat/completions", json=_body(f"hello {i}", 5)
            ) as resp:
                await resp.read()
                return resp.status

        assert await asyncio.gather(*(complete(i) for i in range(20))) == [200] * 20
        # Whichever process a scrape reaches answers for both (snapshots are <= 1 s old).
        await asyncio.sleep(1.5)
        for _ in range(6):
            ok = await _metric(session, cluster.url, "baton_frontend_requests_total", "ok")
            assert ok == 20
        # One process dies: the other keeps serving, and the parent starts a new one.
        children[0].send_signal(signal.SIGKILL)
        children[0].wait(timeout=10)
        assert await asyncio.gather(*(complete(i) for i in range(10))) == [200] * 10
        async with asyncio.timeout(30):
            while True:
                ids = await _ready_ids(cluster.url, 20)
                if len(ids) == 2 and ids != first_ids:
                    break
                await asyncio.sleep(0.2)
        assert len(parent.children()) == 2
        assert await asyncio.gather(*(complete(i) for i in range(10))) == [200] * 10


async def test_a_burst_past_every_queue_waits_instead_of_failing(start_cluster):
    # The worker queues at most 2 requests and runs 2: of 40 sent at once, 36 would be
    # refused with 503 if the frontend did not hold them until the worker has room.
    cluster = await start_cluster(
        num_workers=1, worker_args=("--max-waiting", "2", "--max-num-seqs", "2")
    )
    async with aiohttp.ClientSession() as session:

        async def complete(i: int) -> tuple[int, int]:
            async with session.post(
                f"{cluster.api}/chat/completions", json=_body(f"burst {i}", 8)
            ) as resp:
                body = await resp.json()
                tokens = body["usage"]["completion_tokens"] if resp.status == 200 else -1
                return resp.status, tokens

        async with asyncio.timeout(60):
            results = await asyncio.gather(*(complete(i) for i in range(40)))
    assert results == [(200, 8)] * 40


async def test_a_queued_request_gives_up_after_the_queue_timeout(start_cluster):
    # A slow worker with room for one running and one waiting request: the others wait at
    # most --queue-timeout-s, then get 503 in the OpenAI shape with Retry-After.
    cluster = await start_cluster(
        num_workers=1,
        worker_args=("--max-waiting", "1", "--max-num-seqs", "1", "--speedup", "0.05"),
        frontend_args=("--queue-timeout-s", "1"),
    )
    async with aiohttp.ClientSession() as session:

        async def complete(i: int) -> tuple[int, dict, str | None]:
            async with session.post(
                f"{cluster.api}/chat/completions", json=_body(f"slow {i}", 200)
            ) as resp:
                return resp.status, await resp.json(), resp.headers.get("Retry-After")

        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(60):
            tasks = [asyncio.create_task(complete(i)) for i in range(6)]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            waited_s = loop.time() - started
            results = await asyncio.gather(*tasks)
    refused = [(body, retry) for status, body, retry in results if status == 503]
    assert refused, results
    assert 0.9 <= waited_s < 10, waited_s  # the first refusals came after the queue timeout
    for body, retry in refused:
        assert body["error"]["type"]
        assert "stayed full" in body["error"]["message"]
        assert retry is not None


async def test_a_request_queued_on_a_live_worker_outlasts_the_stream_idle_timeout(start_cluster):
    # One request runs at a time, about 1 s each: the last of 4 waits ~3 s on the worker
    # with no token, far past the 0.4 s idle timeout. Its worker keeps reporting, so it
    # stays (with one worker, a stream failed there would have nowhere to move).
    cluster = await start_cluster(
        num_workers=1,
        worker_args=("--max-num-seqs", "1", "--speedup", "0.1"),
        frontend_args=("--stream-idle-timeout-s", "0.4"),
    )
    async with aiohttp.ClientSession() as session:

        async def complete(i: int) -> tuple[int, int]:
            async with session.post(
                f"{cluster.api}/chat/completions", json=_body(f"queued {i}", 15)
            ) as resp:
                body = await resp.json()
                tokens = body["usage"]["completion_tokens"] if resp.status == 200 else -1
                return resp.status, tokens

        async with asyncio.timeout(60):
            results = await asyncio.gather(*(complete(i) for i in range(4)))
        assert results == [(200, 15)] * 4
        assert await _metric(session, cluster.url, "baton_frontend_migrations_total") == 0


async def test_a_client_that_stops_reading_is_cut_and_its_request_ends(start_cluster):
    # One step's token an event (no publish interval): 8,000 events overflow the kernel's
    # buffers many times over; fewer, fuller events might all fit in them.
    cluster = await start_cluster(
        num_workers=1,
        worker_args=("--speedup", "50", "--publish-interval-ms", "0"),
        frontend_args=("--write-timeout-s", "1"),
    )
    payload = json.dumps(_body("never read", 8000, stream=True)).encode()
    host, port = cluster.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, int(port)))
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    await loop.sock_sendall(sock, request + payload)
    try:
        async with aiohttp.ClientSession() as session:
            # It is in flight; then, never read, it is cut and its request ends.
            gauge = "baton_frontend_in_flight_requests"
            async with asyncio.timeout(30):
                await _until(lambda: _metric(session, cluster.url, gauge), 1)
                await _until(lambda: _metric(session, cluster.url, gauge), 0)
            # Ended as cut, not as finished: 8,000 tokens cannot have been delivered.
            assert (
                await _metric(session, cluster.url, "baton_frontend_requests_total", 'status="cut"')
                == 1
            )
            assert (
                await _metric(session, cluster.url, "baton_frontend_requests_total", 'status="ok"')
                == 0
            )
    finally:
        sock.close()


async def _metric(session: aiohttp.ClientSession, url: str, name: str, label: str = "") -> float:
    """The sum of a metric's samples on /metrics (those with ``label``, if given)."""
    async with session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and label in line:
            total += float(line.split()[-1])
    return total


async def _until(read, value: float) -> None:
    """Poll ``read()`` until it returns ``value``; the caller bounds the wait."""
    while await read() != value:  # noqa: ASYNC110 - another process's state: polling it
        await asyncio.sleep(0.1)
