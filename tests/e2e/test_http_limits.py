"""The frontend's HTTP limits, its error shapes and its /openapi.json, on a real cluster."""

import asyncio
import uuid

import aiohttp
import pytest

MODEL = "baton-sim"
LIMITS = (
    "--max-body-bytes",
    "4096",
    "--max-header-bytes",
    "2048",
    "--max-messages",
    "3",
    "--max-prompt-chars",
    "100",
    "--max-stop-strings",
    "2",
)


@pytest.fixture
async def cluster(start_cluster):
    return await start_cluster(num_workers=1, frontend_args=LIMITS)


def assert_openai_error(payload, status: int, param: str | None = None) -> None:
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["code"] == status
    assert error["param"] == param


def chat(**fields):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


async def test_limits_on_the_body_fields_get_400_naming_the_field(cluster):
    url = f"{cluster.api}/chat/completions"
    many = [{"role": "user", "content": "x"}] * 4
    cases = [
        (chat(messages=many), "messages"),
        (chat(messages=[{"role": "user", "content": "y" * 101}]), "messages"),
        (chat(stop=["a", "b", "c"]), "stop"),
        (chat(n=17), "n"),
        (chat(temperature=2.5), "temperature"),
        (chat(max_tokens=0), "max_tokens"),
    ]
    async with aiohttp.ClientSession() as session:
        for body, param in cases:
            async with session.post(url, json=body) as resp:
                assert resp.status == 400, body
                assert_openai_error(await resp.json(), 400, param)
        prompt = {"model": MODEL, "prompt": "z" * 101, "max_tokens": 1}
        async with session.post(f"{cluster.api}/completions", json=prompt) as resp:
            assert resp.status == 400
            assert_openai_error(await resp.json(), 400, "prompt")
        # At the limits exactly, the request is served.
        fits = chat(
            messages=[{"role": "user", "content": "w" * 40}] * 2 + [{"role": "user"}],
            stop=["@@never-1@@", "@@never-2@@"],  # two, the limit; text the sim never makes
            max_tokens=3,
            ignore_eos=True,
        )
        async with session.post(url, json=fits) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["usage"]["completion_tokens"] == 3


async def test_large_bodies_and_headers_get_clean_4xx(cluster):
    url = f"{cluster.api}/chat/completions"
    big = chat(user="u" * 5000)
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=big) as resp:
            assert resp.status == 413
            assert resp.content_type == "application/json"
            payload = await resp.json()
            assert_openai_error(payload, 413)
            assert "4096" in payload["error"]["message"]

        async def chunked():  # no Content-Length: the limit holds while reading
            for _ in range(10):
                yield b" " * 1000

        async with session.post(url, data=chunked()) as resp:
            assert resp.status == 413
            assert_openai_error(await resp.json(), 413)
        headers = {f"X-Filler-{i}": "h" * 600 for i in range(4)}
        async with session.post(url, json=chat(), headers=headers) as resp:
            assert resp.status == 431
            assert_openai_error(await resp.json(), 431)
        # One header past aiohttp's own parser bound (4x the limit) is answered by aiohttp
        # itself, before any application code: a 400, and the connection is closed.
        async with session.post(url, json=chat(), headers={"X-Huge": "h" * 9000}) as resp:
            assert resp.status == 400
            assert "got more than 8192 bytes" in (await resp.text()).lower()
        # The server is unharmed.
        async with session.post(url, json=chat(max_tokens=2)) as resp:
            assert resp.status == 200


async def test_unknown_routes_methods_and_bad_headers_get_openai_errors(cluster):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{cluster.api}/nothing-here") as resp:
            assert resp.status == 404
            assert_openai_error(await resp.json(), 404)
        async with session.get(f"{cluster.api}/chat/completions") as resp:
            assert resp.status == 405
            assert "POST" in resp.headers["Allow"]
            assert_openai_error(await resp.json(), 405)
        for value in ("inf", "nan", "fast"):
            headers = {"X-Baton-SLO-TTFT-Ms": value}
            url = f"{cluster.api}/chat/completions"
            async with session.post(url, json=chat(), headers=headers) as resp:
                assert resp.status == 400, value
                assert_openai_error(await resp.json(), 400)


async def test_openapi_describes_every_route_from_the_request_types(cluster):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{cluster.url}/openapi.json") as resp:
            assert resp.status == 200
            doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {
        "/health",
        "/ready",
        "/metrics",
        "/openapi.json",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/completions",
    }
    schemas = doc["components"]["schemas"]
    chat_schema = schemas["ChatCompletionRequest"]
    assert set(chat_schema["required"]) == {"model", "messages"}
    assert chat_schema["properties"]["messages"]["minItems"] == 1
    assert schemas["ErrorResponse"]["properties"]["error"] == {
        "$ref": "#/components/schemas/ErrorDetail"
    }
    responses = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "404", "413", "429", "431", "503"} <= set(responses)
    assert "securitySchemes" not in doc["components"]  # no API keys on this server


async def test_invented_model_names_add_no_metrics_series(cluster):
    async def series(session) -> list[str]:
        async with session.get(f"{cluster.url}/metrics") as resp:
            text = await resp.text()
        return [line for line in text.splitlines() if line.startswith("baton_frontend_")]

    url = f"{cluster.api}/chat/completions"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=chat(model="first-invented")) as resp:
            assert resp.status == 404
        before = await series(session)
        names = [f"invented-{uuid.uuid4().hex}" for _ in range(50)]

        async def call(name: str) -> int:
            async with session.post(url, json=chat(model=name)) as resp:
                return resp.status

        assert await asyncio.gather(*map(call, names)) == [404] * 50
        after = await series(session)
    assert len(after) == len(before)
    assert not [line for line in after if "invented" in line]
    assert any('model="_unknown"' in line and 'status="404"' in line for line in after)
