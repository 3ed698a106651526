"""The router service's answer to a RouteRequest, and its flags (no servers: route() is sync)."""

import pytest
from nats.aio.client import Client

from proto.messages import (
    InstanceId,
    ModelCard,
    RequestId,
    RouteDecision,
    RouteRequest,
    WorkerInfo,
    WorkerRole,
)
from services.router.config import RouterConfig
from services.router.placement import PlacementService
from shared.bus import Bus
from shared.config import load_config
from shared.errors import NotFound
from shared.routing.cost import RoutingPolicy
from shared.routing.disagg import DisaggPolicy
from shared.routing.router import Router

BS = 16


def worker(worker_id: str, role: WorkerRole, kv_agent: str = "shm") -> WorkerInfo:
    return WorkerInfo(
        worker_id=InstanceId(worker_id),
        model="m",
        role=role,
        subject=f"w.{worker_id}",
        max_num_seqs=8,
        num_kv_blocks=1000,
        kv_agent=kv_agent,
        kv_block_size=BS,
    )


def make_service(*workers: WorkerInfo) -> PlacementService:
    service = PlacementService(
        Bus(Client()),  # never connected: route() does no I/O
        "t",
        Router(),
        prefill_policy=RoutingPolicy(decode_weight=0.0),
        disagg=DisaggPolicy(),
        resync_timeout_s=1.0,
    )
    service.sync_workers({info.worker_id: info for info in workers})
    service.sync_models(
        {"m": ModelCard(name="m", tokenizer="builtin", context_length=8192, kv_block_size=BS)}
    )
    return service


def sample(service: PlacementService, name: str, **labels: str) -> float:
    value = service.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def request(num_tokens: int, model: str = "m") -> RouteRequest:
    return RouteRequest(request_id=RequestId("r"), model=model, token_ids=list(range(num_tokens)))


def test_route_names_a_prefill_worker_only_for_a_remote_prefill():
    service = make_service(worker("d0", WorkerRole.DECODE), worker("p0", WorkerRole.PREFILL))

    remote = service.route(request(4096))
    local = service.route(request(64))

    assert remote == RouteDecision(
        request_id=RequestId("r"),
        worker_id=InstanceId("d0"),
        decode_cached_tokens=0,
        prefill_worker_id=InstanceId("p0"),
    )
    assert remote.prefill_cached_tokens == 0  # retired: never sent
    assert local.prefill_worker_id is None
    placements = "baton_router_prefill_placement_total"
    assert sample(service, placements, where="remote") == 1
    assert sample(service, placements, where="local") == 1
    decisions = "baton_router_decisions_total"
    assert sample(service, decisions, pool="decode", mode="kv") == 2
    assert sample(service, decisions, pool="prefill", mode="kv") == 1
    assert sample(service, "baton_router_worker_decisions_total", worker="p0") == 1


def test_route_prefills_locally_on_a_decode_worker_without_a_kv_agent():
    service = make_service(
        worker("d0", WorkerRole.DECODE, kv_agent=""), worker("p0", WorkerRole.PREFILL)
    )

    assert service.route(request(4096)).prefill_worker_id is None
    assert sample(service, "baton_router_decisions_total", pool="prefill", mode="kv") == 0


def test_route_to_an_unknown_model_is_not_found():
    service = make_service(worker("d0", WorkerRole.DECODE))
    with pytest.raises(NotFound, match="'x'"):
        service.route(request(64, model="x"))


def test_router_config_reads_remote_prefill_thresholds_from_flags_and_env():
    config = load_config(
        RouterConfig,
        "router",
        ["--min-remote-prefill-tokens", "1"],
        env={"BATON_ROUTER_MIN_REMOTE_PREFILL_FRACTION": "0"},
    )

    assert config.disagg_policy() == DisaggPolicy(min_remote_tokens=1, min_remote_fraction=0.0)
    assert RouterConfig().disagg_policy() == DisaggPolicy()


def test_router_config_refuses_bad_remote_prefill_thresholds():
    with pytest.raises(ValueError, match="min_remote_fraction must be in"):
        RouterConfig(min_remote_prefill_fraction=1.5)
    with pytest.raises(ValueError, match="min_remote_tokens must be >= 0"):
        RouterConfig(min_remote_prefill_tokens=-1)
