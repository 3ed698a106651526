"""The kubernetes connector's settings: one name, three spellings, and names Kubernetes accepts."""

import pytest

from services.planner.config import KubernetesConfig, PlannerConfig
from shared.config import load_config


def test_k8s_settings_come_from_flags_then_planner_env_with_manifest_defaults():
    config = load_config(
        PlannerConfig,
        "planner",
        ["--connector", "kubernetes", "--k8s-namespace", "serving"],
        env={
            "BATON_PLANNER_K8S_DECODE_DEPLOYMENT": "my-decode",
            "BATON_PLANNER_K8S_NAMESPACE": "ignored",  # the flag wins
            "BATON_NAMESPACE": "prod",  # Baton's namespace, not the Kubernetes one
        },
    )
    assert config.namespace == "prod"
    assert config.k8s == KubernetesConfig(
        k8s_namespace="serving",
        k8s_decode_deployment="my-decode",
        k8s_prefill_deployment="baton-prefill",
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"k8s_namespace": "Serving"}, "DNS-1123 label"),
        ({"k8s_namespace": "a" * 64}, "DNS-1123 label"),
        ({"k8s_decode_deployment": "decode_workers"}, "DNS-1123 subdomain"),
        ({"k8s_prefill_deployment": ""}, "DNS-1123 subdomain"),
        ({"k8s_api_url": "127.0.0.1:6443"}, "http"),
        ({"k8s_timeout_s": 0}, "k8s_timeout_s"),
    ],
)
def test_k8s_settings_refuse_what_kubernetes_would(settings, message):
    with pytest.raises(ValueError, match=message):
        KubernetesConfig(**settings)
