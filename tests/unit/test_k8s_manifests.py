"""k8s/: every overlay renders, validates against the Kubernetes schemas, and keeps the promises
docs/deploy.md makes (HTTP probes, resources, drains that fit the grace period, PDBs, the
planner's RBAC).

``render`` is a small kustomize for the subset k8s/ uses (resources, strategic-merge patches by
path), so this runs without kubectl; where ``kubectl kustomize`` exists, its output must match.
"""

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.planner.config import KubernetesConfig

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S = Path(__file__).resolve().parents[2] / "k8s"
OVERLAYS = (
    "agg",
    "disagg",
    "disagg-router",
    "gpu",
    "agg-planner",
    "disagg-planner",
    "disagg-planner-switch",
)
PLANNER_OVERLAYS = ("agg-planner", "disagg-planner", "disagg-planner-switch")
# The oldest Kubernetes still commonly run, and the newest schema the package bundles.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())
# Lists that strategic merge combines item by item, matched on "name" (Kubernetes' merge key
# for these); any other list in both a resource and its patch is refused, not guessed.
MERGE_BY_NAME = {"containers", "initContainers", "env", "volumes"}
DRAIN_TIMEOUT_S = 30

Doc = dict[str, Any]


def load_docs(path: Path) -> list[Doc]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def merge(base: Any, patch: Any, key: str = "") -> Any:
    """Strategic merge of ``patch`` into ``base`` (kustomize's order: patched list items first)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        if any(k.startswith("$") for k in patch):
            raise NotImplementedError(f"patch directives are not supported: {sorted(patch)}")
        merged = dict(base)
        for k, value in patch.items():
            merged[k] = merge(base[k], value, k) if k in base else copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list):
        if key not in MERGE_BY_NAME:
            raise NotImplementedError(f"no merge rule for list {key!r}")
        by_name = {item["name"]: item for item in base}
        patched = [merge(by_name[p["name"]], p) if p["name"] in by_name else p for p in patch]
        names = {p["name"] for p in patch}
        return patched + [item for item in base if item["name"] not in names]
    return copy.deepcopy(patch)


def render(directory: Path) -> list[Doc]:
    """The objects a kustomization directory renders to."""
    kustomization = load_docs(directory / "kustomization.yaml")[0]
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "patches"}
    if unsupported:
        raise NotImplementedError(f"{directory}: {sorted(unsupported)}")
    docs: list[Doc] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        docs.extend(render(path) if path.is_dir() else load_docs(path))
    for entry in kustomization.get("patches", []):
        if set(entry) != {"path"}:
            raise NotImplementedError(f"{directory}: patch {entry}")
        for patch in load_docs(directory / entry["path"]):
            (index,) = [i for i, doc in enumerate(docs) if ident(doc) == ident(patch)]
            docs[index] = merge(docs[index], patch)
    idents = [ident(doc) for doc in docs]
    assert len(idents) == len(set(idents)), f"duplicate objects in {directory}"
    return docs


def ident(doc: Doc) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def objects(overlay: str) -> dict[tuple[str, str], Doc]:
    return {ident(doc): doc for doc in render(K8S / "overlays" / overlay)}


def pod_specs(overlay: str) -> dict[str, Doc]:
    """Pod spec by workload name, for every Deployment and StatefulSet."""
    return {
        name: doc["spec"]["template"]["spec"]
        for (kind, name), doc in objects(overlay).items()
        if kind in ("Deployment", "StatefulSet")
    }


def env_of(container: Doc) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_overlay_renders_to_objects_valid_against_kubernetes_schemas(overlay, version):
    docs = render(K8S / "overlays" / overlay)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_render_matches_kubectl_kustomize(overlay):
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"kubectl kustomize is unavailable: {result.stderr.strip()[:200]}")
    rendered = {ident(doc): doc for doc in yaml.safe_load_all(result.stdout) if doc}
    assert rendered == objects(overlay)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_http_probes_resources_and_a_pull_policy(overlay):
    for name, spec in pod_specs(overlay).items():
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for container in spec["containers"]:
            for probe in ("livenessProbe", "readinessProbe"):
                assert "httpGet" in container[probe], (name, probe)
            assert container["imagePullPolicy"] == "IfNotPresent", name
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
            assert "memory" in container["resources"]["limits"], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_and_frontend_are_probed_on_their_http_port_and_outlast_their_drain(overlay):
    for name, spec in pod_specs(overlay).items():
        if name not in ("baton-decode", "baton-prefill", "baton-frontend"):
            continue
        (container,) = spec["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        expected_port = 8000 if name == "baton-frontend" else 8081
        assert ports == {"http": expected_port}
        assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
        env = env_of(container)
        drain_s = float(env.get("BATON_DRAIN_TIMEOUT_S") or env["BATON_FRONTEND_DRAIN_TIMEOUT_S"])
        assert drain_s == DRAIN_TIMEOUT_S
        assert spec["terminationGracePeriodSeconds"] >= drain_s + 5 + 5  # + preStop, + close


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_bind_http_everywhere_and_advertise_kv_on_the_pod_ip(overlay):
    for name, spec in pod_specs(overlay).items():
        if name in ("baton-decode", "baton-prefill"):
            env = env_of(spec["containers"][0])
            assert env["BATON_HTTP_HOST"] == "0.0.0.0"
            assert env["BATON_HTTP_PORT"] == "8081"
            assert env["BATON_KV_TRANSFER_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_baton_deployment_has_a_disruption_budget_over_its_pods(overlay):
    found = objects(overlay)
    for (kind, name), doc in found.items():
        if kind != "Deployment":
            continue
        budget = found[("PodDisruptionBudget", name)]
        assert budget["spec"]["selector"] == doc["spec"]["selector"]
        assert budget["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nats_and_etcd_run_as_statefulsets_behind_services(overlay):
    found = objects(overlay)
    config = found[("ConfigMap", "baton")]["data"]
    assert config["BATON_NATS_URL"] == "nats://nats:4222"
    assert config["BATON_ETCD_URL"] == "http://etcd:2379"
    for name, port in (("nats", 4222), ("etcd", 2379)):
        stateful = found[("StatefulSet", name)]
        assert found[("Service", stateful["spec"]["serviceName"])]["spec"]["clusterIP"] == "None"
        assert found[("Service", name)]["spec"]["ports"][0]["port"] == port
    (nats,) = found[("StatefulSet", "nats")]["spec"]["template"]["spec"]["containers"]
    assert nats["command"] == ["nats-server", "-c", "/etc/baton/nats.conf"]  # no -js


def test_agg_runs_no_router_and_no_prefill_workers():
    specs = pod_specs("agg")
    assert set(specs) == {"nats", "etcd", "baton-frontend", "baton-decode"}
    assert env_of(specs["baton-frontend"]["containers"][0])["BATON_FRONTEND_ROUTE_TIMEOUT_S"] == "0"


@pytest.mark.parametrize(
    ("overlay", "mode", "num_routers"), [("disagg", "least_loaded", 1), ("disagg-router", "kv", 2)]
)
def test_disagg_overlays_run_prefill_workers_and_routers(overlay, mode, num_routers):
    found = objects(overlay)
    assert found[("Deployment", "baton-prefill")]["spec"]["replicas"] >= 1
    router = found[("Deployment", "baton-router")]
    assert router["spec"]["replicas"] == num_routers
    assert env_of(router["spec"]["template"]["spec"]["containers"][0])["BATON_ROUTER_MODE"] == mode
    frontend = found[("Deployment", "baton-frontend")]["spec"]["template"]["spec"]
    assert "BATON_FRONTEND_ROUTE_TIMEOUT_S" not in env_of(frontend["containers"][0])


def test_gpu_overlay_gives_each_torch_decode_worker_a_gpu():
    spec = pod_specs("gpu")["baton-decode"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].startswith("baton-engine:")
    env = env_of(container)
    assert (env["BATON_ENGINE"], env["BATON_DEVICE"]) == ("torch", "cuda")
    assert env["BATON_KV_TRANSFER"] == "none"  # no transport registers GPU memory yet
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    others = [
        c for name, s in pod_specs("gpu").items() if name != "baton-decode" for c in s["containers"]
    ]
    assert all("nvidia.com/gpu" not in c["resources"].get("limits", {}) for c in others)


@pytest.mark.parametrize("overlay", PLANNER_OVERLAYS)
def test_planner_scales_the_overlays_worker_deployments_with_only_the_rights_it_needs(overlay):
    found = objects(overlay)
    spec = found[("Deployment", "baton-planner")]["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}  # never two planners at once
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["baton-planner", "--connector", "kubernetes"]
    env = env_of(container)
    assert env["BATON_PLANNER_K8S_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    # The Deployments it scales: the ones its defaults name, and the overlay holds.
    defaults = KubernetesConfig()
    decode = env["BATON_PLANNER_K8S_DECODE_DEPLOYMENT"]
    prefill = env["BATON_PLANNER_K8S_PREFILL_DEPLOYMENT"]
    assert (decode, prefill) == (defaults.k8s_decode_deployment, defaults.k8s_prefill_deployment)
    assert ("Deployment", decode) in found
    plans_prefill = int(env["BATON_PLANNER_MAX_PREFILL_WORKERS"]) > 0
    workers = env.get("BATON_PLANNER_K8S_WORKERS_DEPLOYMENT")
    if workers is None:
        assert plans_prefill == (("Deployment", prefill) in found)
    else:  # one Deployment for both roles: the planner switches its pods' roles
        assert workers == decode
        assert plans_prefill
        assert ("Deployment", prefill) not in found
    # Its identity: a ServiceAccount bound to a Role that reads the worker Deployments and
    # reads and writes their scale subresource, as the connector does, and nothing more.
    assert pod["serviceAccountName"] == "baton-planner"
    assert found[("ServiceAccount", "baton-planner")]
    binding = found[("RoleBinding", "baton-planner")]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "baton-planner",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "baton-planner"}]
    rules = found[("Role", "baton-planner")]["rules"]
    workers = [decode, prefill]
    assert rules == [
        {"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": workers,
         "verbs": ["get"]},
        {"apiGroups": ["apps"], "resources": ["deployments/scale"], "resourceNames": workers,
         "verbs": ["get", "patch"]},
    ]  # fmt: skip


def test_render_refuses_lists_it_cannot_merge():
    with pytest.raises(NotImplementedError, match="ports"):
        merge({"ports": [{"containerPort": 1}]}, {"ports": [{"containerPort": 2}]}, "ports")
