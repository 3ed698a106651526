"""API keys on the frontend: --api-key, --api-key-file and --metrics-require-key, for real."""

import aiohttp
import openai
import pytest

MODEL = "baton-sim"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# one key a line\n\nkey-from-file\n")
    return path


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_unauthorized(resp, payload) -> None:
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_api_key"
    assert "wrong" not in error["message"]  # the presented key is never echoed


async def test_api_needs_one_of_the_keys_and_probes_stay_open(start_cluster, key_file):
    cluster = await start_cluster(
        num_workers=1, frontend_args=("--api-key", "k1, k2", "--api-key-file", str(key_file))
    )
    url = f"{cluster.api}/chat/completions"
    async with aiohttp.ClientSession() as session:
        for headers in ({}, bearer("wrong"), {"Authorization": "Basic azE6"}, bearer("k1x")):
            async with session.post(url, json=CHAT, headers=headers) as resp:
                assert_unauthorized(resp, await resp.json())
            async with session.get(f"{cluster.api}/models", headers=headers) as resp:
                assert_unauthorized(resp, await resp.json())
        for key in ("k1", "k2", "key-from-file"):
            async with session.post(url, json=CHAT, headers=bearer(key)) as resp:
                assert resp.status == 200, await resp.text()
        for path in ("/health", "/ready", "/openapi.json", "/metrics"):
            async with session.get(f"{cluster.url}{path}") as resp:
                assert resp.status == 200, path
        async with session.get(f"{cluster.url}/openapi.json") as resp:
            doc = await resp.json()
    assert doc["security"] == [{"bearer": []}]
    assert doc["paths"]["/health"]["get"]["security"] == []

    def sdk(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=cluster.api, api_key=key, max_retries=0, timeout=30)

    with pytest.raises(openai.AuthenticationError):
        sdk("nope").models.list()
    assert [m.id for m in sdk("key-from-file").models.list().data] == [MODEL]


async def test_metrics_need_a_key_when_asked(start_cluster):
    cluster = await start_cluster(
        num_workers=1,
        frontend_args=("--api-key", "secret-key", "--metrics-require-key", "true"),
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{cluster.url}/metrics") as resp:
            assert_unauthorized(resp, await resp.json())
        async with session.get(f"{cluster.url}/metrics", headers=bearer("secret-key")) as resp:
            assert resp.status == 200
            assert "baton_frontend_requests" in await resp.text()
        async with session.get(f"{cluster.url}/health") as resp:
            assert resp.status == 200
