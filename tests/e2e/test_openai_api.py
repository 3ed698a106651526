"""The OpenAI-compatible API end to end: services started by their CLIs, called by the SDK."""

import asyncio
import json

import aiohttp
import openai
import pytest

from proto import subjects
from proto.messages import InstanceId, LoadMetrics, RequestId, TokenBatch, TokenChunk
from shared.bus import Bus
from shared.codec import load_metrics_decoder

MODEL = "baton-sim"


@pytest.fixture
async def cluster(start_cluster):
    return await start_cluster(num_workers=2)


def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.api, api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_served_model(cluster):
    models = client(cluster).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_sdk_streams_a_chat_completion(cluster):
    stream = client(cluster).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a story about a baton."}],
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 40
    assert chunks[-1].usage.prompt_tokens > 5
    assert len(text.split()) >= 10  # the simulated engine emits word tokens


def test_greedy_output_is_the_same_streamed_or_not(cluster):
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "same prompt"}],
        max_tokens=30,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    full = client(cluster).chat.completions.create(**kwargs)
    streamed = client(cluster).chat.completions.create(stream=True, **kwargs)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert full.choices[0].message.content == text
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 30
    assert full.object == "chat.completion"


def test_text_completion_accepts_a_string_or_token_ids(cluster):
    c = client(cluster)
    by_text = c.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert by_text.choices[0].finish_reason == "length"
    assert by_text.usage.completion_tokens == 8
    by_ids = c.completions.create(
        model=MODEL, prompt=[5, 6, 7, 8], max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert by_ids.usage.prompt_tokens == 4
    assert by_ids.usage.completion_tokens == 5


def test_stop_string_ends_the_stream_before_it(cluster):
    c = client(cluster)
    kwargs = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "stop test"}],
        temperature=0,
        max_tokens=40,
        extra_body={"ignore_eos": True},
    )
    text = c.chat.completions.create(**kwargs).choices[0].message.content
    words = text.split()
    stop = " " + words[len(words) // 2]
    expected = text[: text.index(stop)]
    stopped = c.chat.completions.create(stop=[stop], **kwargs)
    assert stopped.choices[0].message.content == expected
    assert stopped.choices[0].finish_reason == "stop"
    streamed = c.chat.completions.create(stop=stop, stream=True, **kwargs)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == expected


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, None),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"},
            400,
            "max_tokens",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
            400,
            None,
        ),
        (
            {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
            400,
            "messages[0].role",
        ),
        ({"model": MODEL, "messages": []}, 400, None),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 17}, 400, None),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 9},
            400,
            None,
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 9000}]}, 400, None),
        ({"model": MODEL, "prompt": [1, 2, 10**9]}, 400, None),
        ({"messages": [{"role": "user", "content": "hi"}]}, 400, None),
    ],
)
async def test_bad_requests_get_openai_errors(cluster, body, status, param):
    endpoint = "completions" if "prompt" in body else "chat/completions"
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{cluster.api}/{endpoint}", json=body) as resp:
            assert resp.status == status
            payload = await resp.json()
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert "Traceback" not in error["message"]
    assert error["code"] == status
    if param is not None:
        assert error["param"] == param


async def test_invalid_json_gets_400(cluster):
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{cluster.api}/chat/completions", data=b"{not json") as resp:
            assert resp.status == 400
            assert "JSON" in (await resp.json())["error"]["message"]


def test_sdk_raises_typed_errors(cluster):
    with pytest.raises(openai.NotFoundError):
        client(cluster).chat.completions.create(
            model="missing", messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(cluster).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=-1
        )


async def _stream_text(session, url, body) -> str:
    async with session.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        parts = []
        async for line in resp.content:
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                assert "error" not in event, event
                if event["choices"]:
                    parts.append(event["choices"][0]["delta"].get("content") or "")
        return "".join(parts)


async def test_bad_requests_do_not_hurt_concurrent_streams(cluster):
    good = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
        "stream": True,
        "max_tokens": 20,
        "ignore_eos": True,
        "temperature": 0,
    }
    bad = {"model": MODEL, "messages": [{"role": "user", "content": 5}], "stream": True}
    url = f"{cluster.api}/chat/completions"
    async with aiohttp.ClientSession() as session:

        async def bad_call() -> int:
            async with session.post(url, json=bad) as resp:
                return resp.status

        results = await asyncio.gather(
            *[_stream_text(session, url, good) for _ in range(30)],
            *[bad_call() for _ in range(30)],
        )
    texts, statuses = results[:30], results[30:]
    assert statuses == [400] * 30
    assert len(set(texts)) == 1  # greedy, same prompt: every stream identical
    assert texts[0]


async def test_client_disconnect_aborts_the_request_on_the_worker(cluster):
    loads: dict[str, LoadMetrics] = {}
    arrived: asyncio.Queue[None] = asyncio.Queue()

    async def until(predicate) -> None:
        async with asyncio.timeout(10):
            while not predicate():
                await arrived.get()

    def num_running() -> int:
        return sum(m.num_running for m in loads.values())

    async with Bus.connect(cluster.nats_url) as bus:

        async def on_load(msg):
            load = load_metrics_decoder.decode(msg.data)
            loads[load.worker_id] = load
            arrived.put_nowait(None)

        await bus.subscribe(subjects.load_metrics_all(cluster.namespace), on_load)
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "long"}],
            "stream": True,
            "max_tokens": 4000,
            "ignore_eos": True,
        }
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{cluster.api}/chat/completions", json=body) as resp:
                assert resp.status == 200
                await resp.content.readline()
                await until(lambda: num_running() == 1)
            # Leaving the block closes the connection mid-stream.
        await until(lambda: len(loads) == 2 and num_running() == 0)


async def test_overloaded_workers_give_503_with_retry_after(start_cluster):
    # A worker that queues nothing, and a frontend that does not wait for room either.
    cluster = await start_cluster(
        num_workers=1,
        worker_args=("--max-waiting", "0"),
        frontend_args=("--queue-timeout-s", "0"),
    )
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{cluster.api}/chat/completions", json=body) as resp:
            assert resp.status == 503
            assert int(resp.headers["Retry-After"]) >= 1
            assert (await resp.json())["error"]["type"] == "overloaded_error"


async def test_metrics_count_requests_and_tokens(cluster):
    client(cluster).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "count me"}],
        max_tokens=5,
        extra_body={"ignore_eos": True},
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{cluster.url}/metrics") as resp:
            text = await resp.text()
    assert (
        'baton_frontend_requests_total{endpoint="chat",model="baton-sim",status="ok"} 1.0' in text
    )
    assert "baton_frontend_output_tokens_total 5.0" in text
    assert "baton_frontend_time_to_first_token_seconds_count 1.0" in text


async def test_metrics_count_dropped_token_chunks(cluster):
    """Chunks for no open stream (orphans) and chunks for an open stream from a worker it does
    not follow (stale) are dropped, and counted on /metrics."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "long"}],
        "stream": True,
        "max_tokens": 4000,
        "ignore_eos": True,
    }
    async with aiohttp.ClientSession() as session, Bus.connect(cluster.nats_url) as bus:
        async with session.get(f"{cluster.url}/ready") as resp:
            inbox = subjects.stream_inbox(cluster.namespace, (await resp.json())["frontend_id"])
        async with session.post(f"{cluster.api}/chat/completions", json=body) as resp:
            assert resp.status == 200
            first = json.loads((await resp.content.readline()).removeprefix(b"data: "))
            # Streaming (its first token came), so bound to the worker that serves it.
            request_id = RequestId(first["id"].removeprefix("chatcmpl-"))
            stranger = InstanceId("not-its-worker")
            stale = TokenBatch(worker_id=stranger, chunks=[TokenChunk(request_id, [1])])
            orphans = TokenBatch(
                worker_id=stranger,
                chunks=[TokenChunk(RequestId(f"gone-{i}"), [1]) for i in range(3)],
            )
            await bus.publish(inbox, stale)
            await bus.publish(inbox, orphans)
            expected = {
                "baton_frontend_stale_chunks_total 1.0",
                "baton_frontend_orphan_chunks_total 3.0",
            }
            lines: set[str] = set()
            async with asyncio.timeout(10):
                while not expected <= lines:
                    await asyncio.sleep(0.05)
                    async with session.get(f"{cluster.url}/metrics") as scraped:
                        lines = set((await scraped.text()).splitlines())
            # Leaving the block closes the connection mid-stream.
