"""The planner's kubernetes connector against a real HTTP server playing the Kubernetes API's
Deployment scale subresource (tests/kubernetes_api.py): what it reads and writes, how it
authenticates (kubeconfig token, in-cluster service account over TLS), and how it lives with
an API that is down, slow, refusing or changed under it. Every request it sends, and every
answer the server gives, is checked against the Kubernetes schemas."""

import asyncio
import logging
import re
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.planner.config import KubernetesConfig, PlannerConfig
from services.planner.kubernetes import (
    FIELD_MANAGER,
    Replicas,
    kubernetes_connector,
    load_kube_config,
)
from services.planner.policy import Decision
from services.planner.signals import Role
from shared.errors import Unavailable
from shared.servers import free_port
from tests.kubernetes_api import (
    KubernetesAPI,
    assert_valid_against_kubernetes_schemas,
    start,
    write_kubeconfig,
)

TOKEN = "planner-token"
NS = "serving"
BOTH = (Role.DECODE, Role.PREFILL)
SCALE_PATH = f"/apis/apps/v1/namespaces/{NS}/deployments/{{}}/scale"


@pytest.fixture
async def api() -> AsyncIterator[KubernetesAPI]:
    api = KubernetesAPI(token=TOKEN)
    api.add(NS, "baton-decode", 2)
    api.add(NS, "baton-prefill", 1)
    runner = await start(api)
    try:
        yield api
    finally:
        await runner.cleanup()
    assert_valid_against_kubernetes_schemas(api)


def k8s_config(kubeconfig: Path, **overrides: Any) -> KubernetesConfig:
    return KubernetesConfig(k8s_kubeconfig=str(kubeconfig), **overrides)


@pytest.fixture
def kubeconfig(api: KubernetesAPI, tmp_path: Path) -> Path:
    return write_kubeconfig(tmp_path / "kubeconfig", api.url, TOKEN, NS)


def up(desired: int, previous: int) -> Decision:
    return Decision(desired, previous, "queue", f"{previous} -> {desired}")


def hold(desired: int, reason: str = "pending") -> Decision:
    return Decision(desired, desired, reason, "held")


async def test_connector_reads_each_pools_replicas_with_the_bearer_token(api, kubeconfig):
    async with kubernetes_connector(k8s_config(kubeconfig), BOTH) as connector:
        assert connector.namespace == NS  # the kubeconfig context's
        assert await connector.replicas(Role.DECODE) == Replicas(2, 2, "1")
        assert (await connector.replicas(Role.PREFILL)).desired == 1
    # Read at start-up (logged), then by the calls above; nothing written.
    assert [(r.method, r.path) for r in api.requests] == [
        ("GET", SCALE_PATH.format("baton-decode")),
        ("GET", SCALE_PATH.format("baton-prefill")),
        ("GET", SCALE_PATH.format("baton-decode")),
        ("GET", SCALE_PATH.format("baton-prefill")),
    ]
    assert {r.authorization for r in api.requests} == {f"Bearer {TOKEN}"}
    assert {r.status for r in api.requests} == {200}


async def test_connector_scales_with_a_merge_patch_of_the_scale_subresource(api, kubeconfig):
    async with kubernetes_connector(k8s_config(kubeconfig), BOTH) as connector:
        api.requests.clear()
        await connector.apply(Role.DECODE, up(3, 2))
        await connector.apply(Role.PREFILL, up(0, 1))
    assert api.replicas(NS, "baton-decode") == 3
    assert api.replicas(NS, "baton-prefill") == 0
    get_decode, patch_decode, _, patch_prefill = api.requests
    assert (get_decode.method, patch_decode.method) == ("GET", "PATCH")
    assert patch_decode.path == SCALE_PATH.format("baton-decode")
    assert patch_decode.content_type == "application/merge-patch+json"
    assert patch_decode.query == {"fieldManager": FIELD_MANAGER}
    # The full object, so it can be checked against the Scale schema; the resourceVersion
    # read makes the write conditional.
    assert patch_decode.body == {
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {"name": "baton-decode", "namespace": NS, "resourceVersion": "1"},
        "spec": {"replicas": 3},
    }
    assert patch_decode.status == 200
    assert patch_prefill.body["spec"] == {"replicas": 0}
    assert patch_prefill.path == SCALE_PATH.format("baton-prefill")


async def test_connector_writes_only_changes_and_only_the_way_they_go(api, kubeconfig):
    async with kubernetes_connector(k8s_config(kubeconfig), BOTH) as connector:
        api.requests.clear()
        await connector.apply(Role.DECODE, hold(2, "steady"))  # a hold says nothing
        assert api.requests == []
        # Up to 2 from 1 registered worker: the Deployment has 2 (one still starting).
        await connector.apply(Role.DECODE, up(2, 1))
        # Down to 1 from 2 registered workers while the Deployment already says 1.
        api.deployments[NS, "baton-prefill"].replicas = 1
        await connector.apply(Role.PREFILL, Decision(1, 2, "idle", "2 -> 1"))
        await connector.apply(Role.DECODE, hold(2))  # written: nothing to retry
    assert [r.method for r in api.requests] == ["GET", "GET"]
    assert api.replicas(NS, "baton-decode") == 2


async def test_one_deployment_for_both_roles_is_scaled_to_the_pools_total(api, kubeconfig):
    api.add(NS, "baton-workers", 2)
    config = k8s_config(kubeconfig, k8s_workers_deployment="baton-workers")
    async with kubernetes_connector(config, BOTH) as connector:
        assert connector.deployments == dict.fromkeys(BOTH, "baton-workers")
        api.requests.clear()
        # An interval: nothing is written until every pool has decided.
        await connector.apply(Role.DECODE, up(2, 1))
        assert api.requests == []
        await connector.apply(Role.PREFILL, up(1, 0))
        assert api.replicas(NS, "baton-workers") == 3
        # A steady interval writes nothing; one pool down, the other up, nothing either.
        await connector.apply(Role.DECODE, hold(2, "steady"))
        await connector.apply(Role.PREFILL, hold(1, "steady"))
        await connector.apply(Role.DECODE, Decision(1, 2, "idle", "2 -> 1"))
        await connector.apply(Role.PREFILL, up(2, 1))
        assert [r.method for r in api.requests] == ["GET", "PATCH"]
        # Down to a total of 2.
        await connector.apply(Role.DECODE, hold(1, "steady"))
        await connector.apply(Role.PREFILL, Decision(1, 2, "idle", "2 -> 1"))
    assert api.replicas(NS, "baton-workers") == 2
    assert {r.path for r in api.requests} == {SCALE_PATH.format("baton-workers")}
    # The per-role Deployments were never touched.
    assert api.replicas(NS, "baton-decode") == 2
    assert api.replicas(NS, "baton-prefill") == 1


def test_role_switching_with_kubernetes_needs_one_deployment_for_both_roles():
    assert not PlannerConfig(connector="kubernetes").switches_roles
    workers = KubernetesConfig(k8s_workers_deployment="baton-workers")
    assert PlannerConfig(connector="kubernetes", k8s=workers).switches_roles
    assert not PlannerConfig(
        connector="kubernetes", k8s=workers, role_switching=False
    ).switches_roles
    with pytest.raises(ValueError, match="k8s_workers_deployment"):
        KubernetesConfig(k8s_workers_deployment="Not_A_Name")


async def test_connector_uses_the_deployment_names_and_namespace_it_is_given(api, tmp_path):
    api.add("other", "my-decode", 1)
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url, TOKEN)
    config = k8s_config(kubeconfig, k8s_namespace="other", k8s_decode_deployment="my-decode")
    async with kubernetes_connector(config, [Role.DECODE]) as connector:
        assert connector.deployments == {Role.DECODE: "my-decode"}
        await connector.apply(Role.DECODE, up(4, 1))
    assert api.replicas("other", "my-decode") == 4
    assert {r.path for r in api.requests} == {
        "/apis/apps/v1/namespaces/other/deployments/my-decode/scale"
    }


async def test_api_down_is_logged_retried_while_the_target_holds_then_written(
    api, kubeconfig, caplog
):
    caplog.set_level(logging.INFO, logger="services.planner.kubernetes")
    async with kubernetes_connector(k8s_config(kubeconfig), BOTH) as connector:
        api.outage = 503
        await connector.apply(Role.DECODE, up(3, 2))
        await connector.apply(Role.DECODE, hold(3))  # the planner waits for the pool
        failures = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(failures) == 2
        assert "503 ServiceUnavailable: the API is down" in failures[0].getMessage()
        assert "attempt=2" in failures[1].getMessage()
        assert api.replicas(NS, "baton-decode") == 2
        api.outage = None
        num_before = len(api.requests)
        await connector.apply(Role.DECODE, hold(3))
        assert api.replicas(NS, "baton-decode") == 3
        assert [r.method for r in api.requests[num_before:]] == ["GET", "PATCH"]
        await connector.apply(Role.DECODE, hold(3))  # written: nothing more
        assert len(api.requests) == num_before + 2
    assert "kubernetes: scaled role=decode deployment=serving/baton-decode replicas=3" in (
        caplog.text
    )


async def test_a_failed_target_the_planner_gives_up_is_dropped(api, kubeconfig):
    async with kubernetes_connector(k8s_config(kubeconfig), BOTH) as connector:
        api.outage = 500
        await connector.apply(Role.DECODE, up(3, 2))
        api.outage = None
        num_before = len(api.requests)
        # Past its settle timeout the planner plans from the pool as it is: 2 workers.
        await connector.apply(Role.DECODE, hold(2, "steady"))
        await connector.apply(Role.DECODE, hold(3))
    assert len(api.requests) == num_before
    assert api.replicas(NS, "baton-decode") == 2


async def test_an_unknown_deployment_is_404_logged_with_the_apis_reason(api, kubeconfig, caplog):
    config = k8s_config(kubeconfig, k8s_prefill_deployment="missing")
    async with kubernetes_connector(config, BOTH) as connector:
        with pytest.raises(
            Unavailable, match=re.escape('404 NotFound: deployments.apps "missing" not found')
        ):
            await connector.replicas(Role.PREFILL)
        await connector.apply(Role.PREFILL, up(2, 1))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("cannot read role=prefill" in w and "404 NotFound" in w for w in warnings)
    assert any("scaling failed role=prefill" in w and "404 NotFound" in w for w in warnings)
    assert api.of("PATCH") == []


async def test_a_wrong_token_is_401_and_a_read_only_one_403_on_write(api, tmp_path, caplog):
    wrong = write_kubeconfig(tmp_path / "wrong", api.url, "not-the-token", NS)
    async with kubernetes_connector(k8s_config(wrong), BOTH) as connector:
        with pytest.raises(Unavailable, match="401 Unauthorized"):
            await connector.replicas(Role.DECODE)
    reader = write_kubeconfig(tmp_path / "reader", api.url, api.read_only_token, NS)
    async with kubernetes_connector(k8s_config(reader), BOTH) as connector:
        await connector.apply(Role.DECODE, up(3, 2))
    (patch,) = api.of("PATCH")
    assert patch.status == 403
    assert 'cannot patch resource "deployments/scale"' in caplog.text
    assert "403 Forbidden" in caplog.text
    assert api.replicas(NS, "baton-decode") == 2


async def test_a_change_between_read_and_write_is_409_and_retried_from_a_fresh_read(
    api, kubeconfig, caplog
):
    async with kubernetes_connector(k8s_config(kubeconfig), BOTH) as connector:
        api.requests.clear()
        api.write_between["baton-decode"] = 1  # someone scales to 1 after our read
        await connector.apply(Role.DECODE, up(3, 2))
        assert [r.status for r in api.requests] == [200, 409]
        assert "409 Conflict" in caplog.text
        assert api.replicas(NS, "baton-decode") == 1
        await connector.apply(Role.DECODE, hold(3))
    assert [r.status for r in api.requests] == [200, 409, 200, 200]
    assert api.requests[-1].body["metadata"]["resourceVersion"] == "101"
    assert api.replicas(NS, "baton-decode") == 3


async def test_an_unreachable_api_is_logged_and_never_raised(tmp_path, caplog):
    dead = f"http://127.0.0.1:{free_port()}"
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", dead, TOKEN, NS)
    async with kubernetes_connector(k8s_config(kubeconfig), BOTH) as connector:
        await connector.apply(Role.DECODE, up(3, 2))
        await connector.apply(Role.DECODE, hold(3))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4  # two reads at start-up, two tries
    assert all("ConnectError" in w and dead in w for w in warnings)


async def test_an_api_that_does_not_answer_times_out_and_the_write_is_retried(
    api, kubeconfig, caplog
):
    api.stall = asyncio.Event()
    api.stall.set()
    async with kubernetes_connector(k8s_config(kubeconfig, k8s_timeout_s=0.3), BOTH) as connector:
        api.stall.clear()
        async with asyncio.timeout(5):
            await connector.apply(Role.DECODE, up(3, 2))
        assert "no answer within 0.3 s" in caplog.text or "timed out" in caplog.text
        api.stall.set()
        await connector.apply(Role.DECODE, hold(3))
    assert api.replicas(NS, "baton-decode") == 3


async def test_api_url_replaces_the_kubeconfigs_server_and_keeps_its_token(api, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", dead, TOKEN, NS)
    config = k8s_config(kubeconfig, k8s_api_url=api.url)
    async with kubernetes_connector(config, [Role.DECODE]) as connector:
        assert (await connector.replicas(Role.DECODE)).desired == 2
    assert {r.authorization for r in api.requests} == {f"Bearer {TOKEN}"}


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA) and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=kubernetes",
            "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


async def test_in_cluster_it_uses_the_service_account_token_ca_and_namespace(
    tmp_path, tls_files, monkeypatch
):
    cert, key = tls_files
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    api = KubernetesAPI(token="service-account-token")
    api.add("pod-namespace", "baton-decode", 2)
    runner = await start(api, ssl_context=server_context)
    try:
        account = tmp_path / "serviceaccount"
        account.mkdir()
        (account / "token").write_text("service-account-token")
        (account / "namespace").write_text("pod-namespace")
        (account / "ca.crt").write_bytes(cert.read_bytes())
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(runner.addresses[0][1]))
        found, namespace = load_kube_config(KubernetesConfig(), service_account=str(account))
        assert found.cluster.server == api.url
        assert namespace == "pod-namespace"
        async with kubernetes_connector(
            KubernetesConfig(), [Role.DECODE], service_account=str(account)
        ) as connector:
            await connector.apply(Role.DECODE, up(3, 2))
            assert api.replicas("pod-namespace", "baton-decode") == 3
            # The kubelet rotates the token: the old one is refused (401), the file re-read.
            api.token = "rotated-token"
            (account / "token").write_text("rotated-token")
            await connector.apply(Role.DECODE, up(4, 3))
    finally:
        await runner.cleanup()
    assert api.replicas("pod-namespace", "baton-decode") == 4
    seen = [(r.method, r.status, r.authorization.removeprefix("Bearer ")) for r in api.requests]
    assert seen == [
        ("GET", 200, "service-account-token"),  # at start-up
        ("GET", 200, "service-account-token"),
        ("PATCH", 200, "service-account-token"),
        ("GET", 401, "service-account-token"),
        ("GET", 200, "rotated-token"),
        ("PATCH", 200, "rotated-token"),
    ]
    assert_valid_against_kubernetes_schemas(api)


def test_missing_credentials_are_a_configuration_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    nowhere = str(tmp_path / "no-service-account")
    with pytest.raises(ValueError, match="no Kubernetes API credentials"):
        load_kube_config(KubernetesConfig(), service_account=nowhere)
    with pytest.raises(ValueError, match="not found"):
        load_kube_config(KubernetesConfig(k8s_kubeconfig=str(tmp_path / "absent")))
    # With none found, an API URL alone is used as it is (kubectl proxy holds the credentials).
    proxy = KubernetesConfig(k8s_api_url="http://127.0.0.1:8001")
    found, namespace = load_kube_config(proxy, service_account=nowhere)
    assert (found.cluster.server, namespace) == ("http://127.0.0.1:8001", "default")
