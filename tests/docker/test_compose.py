"""`docker compose up` for real: the image built offline from a wheelhouse, the whole cluster
in containers, chat completions streamed through the OpenAI SDK with the prefill handed off
between containers over tcp, and a decode container killed under it.

Runs where a Docker engine answers (``eval "$(../shared/docker/engine.sh)"`` starts one here
and sets ``BATON_DOCKER_BASE``); skipped elsewhere. The wheelhouse comes from the host's pip,
so the host's Python must be the image's (3.11). ``-o log_cli=true --log-cli-level=INFO``
shows the timeline.
"""

import json
import os
from collections.abc import Iterator

import openai
import pytest
import yaml

from tests.docker.compose_cluster import (
    DISAGG_OVERRIDE,
    REPO,
    ComposeCluster,
    compose_command,
    docker_answers,
    http_get,
    run,
)
from tests.metrics import metric_sum

COMPOSE = compose_command()
ENGINE_PROBLEM = docker_answers()
SERVICES = {"nats", "etcd", "router", "decode", "prefill", "frontend"}
MODEL = "baton-sim"

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(COMPOSE is None, reason="neither `docker compose` nor docker-compose"),
]
needs_engine = pytest.mark.skipif(ENGINE_PROBLEM is not None, reason=str(ENGINE_PROBLEM))


def compose_config(*files: str) -> dict:
    assert COMPOSE is not None
    file_args = [arg for f in files for arg in ("-f", f)]
    return yaml.safe_load(run([*COMPOSE, *file_args, "config"], cwd=REPO))


def test_compose_file_runs_every_service_healthy_and_restarting():
    services = compose_config("compose.yaml")["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name
        assert service["healthcheck"]["test"][0] == "CMD", name
    for name in ("router", "decode", "prefill", "frontend"):
        conditions = {dep["condition"] for dep in services[name]["depends_on"].values()}
        assert conditions == {"service_healthy"}, name
    assert set(services["frontend"]["depends_on"]) == {"nats", "etcd", "router", "decode"}
    assert services["decode"]["deploy"]["replicas"] == 2
    assert "--max_payload" not in json.dumps(services["nats"]["command"])
    for name in ("decode", "prefill", "frontend"):
        # `docker-compose config` writes 45s; `docker compose config` may write 45s or seconds.
        assert services[name]["stop_grace_period"] in ("45s", 45, "45"), name
    for name in ("decode", "prefill"):
        env = services[name]["environment"]
        assert env["BATON_KV_TRANSFER"] == "tcp"
        assert env["BATON_KV_TRANSFER_HOST"] == "0.0.0.0"
    (port,) = services["frontend"]["ports"]
    assert "127.0.0.1" in json.dumps(port)  # short (1.29) or long (v2) syntax
    assert all("ports" not in s for n, s in services.items() if n != "frontend")


def test_gpu_override_reserves_a_gpu_for_each_torch_decode_worker():
    services = compose_config("compose.yaml", "compose.gpu.yaml")["services"]
    decode = services["decode"]
    (device,) = decode["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert decode["deploy"]["replicas"] == 2
    env = decode["environment"]
    assert (env["BATON_ENGINE"], env["BATON_DEVICE"], env["BATON_KV_TRANSFER"]) == (
        "torch",
        "cuda",
        "none",  # no transport registers GPU memory yet: aggregated only
    )
    assert services["prefill"]["deploy"]["replicas"] == 0
    assert decode["image"] != services["frontend"]["image"]
    assert "deploy" not in services["frontend"]
    assert "prefill" not in services["frontend"]["depends_on"]


def test_disagg_override_forces_remote_prefill():
    env = compose_config("compose.yaml", DISAGG_OVERRIDE)["services"]["router"]["environment"]
    assert env["BATON_ROUTER_MIN_REMOTE_PREFILL_TOKENS"] == "1"
    assert env["BATON_ROUTER_MIN_REMOTE_PREFILL_FRACTION"] == "0"
    assert env["BATON_NATS_URL"] == "nats://nats:4222"  # merged, not replaced


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[ComposeCluster]:
    assert COMPOSE is not None
    base = os.environ.get("BATON_DOCKER_BASE", "python:3.11-slim")
    cluster = ComposeCluster(COMPOSE, tmp_path_factory.mktemp("compose"), base)
    t = cluster.timeline
    t.log("compose=%s project=%s base=%s", " ".join(COMPOSE), cluster.project, base)
    cluster.prepare()
    try:
        cluster.run("build", "nats", timeout_s=900)
        size = run(["docker", "image", "inspect", "-f", "{{.Size}}", cluster.image]).strip()
        t.log("image %s built: %.0f MB", cluster.image, int(size) / 1e6)
        cluster.run("up", "-d")
        t.log("up -d returned (nats, etcd, router, decode x2, prefill healthy; frontend started)")
        cluster.wait_ready(120)
        t.log("frontend /ready answers 200 on %s", cluster.api)
        yield cluster
    finally:
        cluster.down()
        t.log("down: every container and the network removed")


def stream_chat(client: openai.OpenAI, prompt: str) -> tuple[str, list[str | None]]:
    """(text, finish reasons) of one streamed chat completion."""
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=16,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    return text, [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]


def remote_prefills(cluster: ComposeCluster) -> float:
    code, text = http_get(f"{cluster.api}/metrics")
    assert code == 200, text
    return metric_sum(text, "baton_frontend_remote_prefills_total")


def worker_steps(cluster: ComposeCluster, container_id: str) -> float:
    text = cluster.exec_get(container_id, "http://127.0.0.1:8081/metrics")
    return metric_sum(text, "baton_worker_steps")


def stream_and_check(client: openai.OpenAI, cluster: ComposeCluster, prompt: str) -> str:
    text, finish = stream_chat(client, prompt)
    assert finish == ["length"], (text, finish, cluster.logs())
    assert text.strip()
    return text


@needs_engine
@pytest.mark.timeout(1800)
def test_compose_cluster_streams_hands_off_prefill_and_survives_a_decode_kill(cluster):
    t = cluster.timeline
    with openai.OpenAI(
        base_url=f"{cluster.api}/v1", api_key="unused", max_retries=0, timeout=60
    ) as client:
        text = stream_and_check(client, cluster, "Hello from compose!")
        assert remote_prefills(cluster) == 0
        t.log("aggregated: streamed %r; remote_prefills_total=0", text[:40])

        cluster.run("up", "-d", "--no-deps", "router", files=("compose.yaml", DISAGG_OVERRIDE))
        cluster.wait_healthy("router", 60)
        t.log("router recreated with MIN_REMOTE_PREFILL_TOKENS=1, FRACTION=0; healthy")
        for attempt in range(10):
            text = stream_and_check(client, cluster, f"Disaggregated hello {attempt}")
            if remote_prefills(cluster) > 0:
                break
        num_remote = remote_prefills(cluster)
        assert num_remote > 0, cluster.logs()
        decodes = cluster.container_ids("decode")
        assert len(decodes) == 2
        pulled = {
            c: metric_sum(
                cluster.exec_get(c, "http://127.0.0.1:8081/metrics"),
                "baton_worker_remote_prefills",
            )
            for c in decodes
        }
        assert sum(pulled.values()) >= num_remote
        t.log(
            "disaggregated: streamed %r; frontend remote_prefills_total=%d, "
            "decode containers pulled %s prompts' KV over tcp",
            text[:40],
            num_remote,
            sorted(pulled.values()),
        )

        # Kill the decode container that served the disaggregated request.
        victim = max(decodes, key=lambda c: pulled[c])
        (survivor,) = set(decodes) - {victim}
        steps_before = worker_steps(cluster, survivor)
        run(["docker", "kill", victim])
        t.log("killed decode container %s", victim[:12])
        for i in range(6):
            stream_and_check(client, cluster, f"After the kill {i}")
            t.log("completion %d after the kill streamed", i + 1)
        assert not json.loads(cluster.state(victim))["Running"]
        assert json.loads(cluster.state(survivor))["Health"]["Status"] == "healthy"
        assert worker_steps(cluster, survivor) > steps_before
        assert http_get(f"{cluster.api}/ready")[0] == 200
        t.log(
            "the other decode container %s served them (engine steps %d -> %d); frontend ready",
            survivor[:12],
            steps_before,
            worker_steps(cluster, survivor),
        )
