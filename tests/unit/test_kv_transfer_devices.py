"""Which transport serves which memory: the per-device choice of ``auto`` and NIXL's memory
types, checked without a GPU."""

import ctypes

import msgspec
import pytest

from shared.engine.config import WorkerConfig
from shared.kv_transfer import (
    AutoAgent,
    CudaIpcAgent,
    NixlAgent,
    ShmAgent,
    TcpAgent,
    TransportUnavailable,
    available_kinds,
    create_agent,
    cuda_ipc_status,
)
from shared.kv_transfer.auto import candidates
from shared.kv_transfer.metadata import RegionDesc, metadata_decoder
from shared.kv_transfer.nixl import group_by_memory, memory_type
from shared.kv_transfer.regions import RegionSet, parse_device

TRANSPORTS = [CudaIpcAgent, ShmAgent, NixlAgent, TcpAgent]  # auto's order of preference
HAS_CUDA = cuda_ipc_status()[0]


def kinds(device_types):
    return [t.kind for t in candidates(TRANSPORTS, device_types)]


def test_parse_device_accepts_cpu_and_cuda_only():
    assert parse_device("cpu") == ("cpu", 0)
    assert parse_device("cuda") == ("cuda", 0)
    assert parse_device("cuda:3") == ("cuda", 3)
    for bad in ("gpu", "cpu:1", "cuda:x", "mps", ""):
        with pytest.raises(ValueError, match="device must be"):
            parse_device(bad)


def test_auto_prefers_cuda_ipc_then_nixl_for_gpu_memory():
    assert kinds({"cuda"}) == ["cuda_ipc", "nixl"]


def test_auto_keeps_shm_nixl_tcp_for_host_memory():
    assert kinds({"cpu"}) == ["shm", "nixl", "tcp"]


def test_auto_reads_between_host_and_gpu_memory_over_nixl_only():
    assert kinds({"cpu", "cuda"}) == ["nixl"]


def test_host_transports_refuse_gpu_memory():
    with create_agent("shm", "s") as agent:
        with pytest.raises(ValueError, match="serve cpu memory only"):
            agent.register(1 << 40, 4096, "cuda:0")


def test_auto_does_not_read_a_gpu_owner_over_shm_or_tcp():
    with AutoAgent("gpu-owner", use_nixl=False) as owner, AutoAgent("r", use_nixl=False) as reader:
        described = metadata_decoder.decode(owner.metadata())
        assert described.shm is not None  # same host: shm would reach it
        forged = msgspec.structs.replace(described, regions=[RegionDesc(1 << 40, 4096, "cuda:0")])
        with pytest.raises(TransportUnavailable, match="serves cuda memory"):
            reader.add_remote(msgspec.msgpack.encode(forged))


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here")
def test_auto_says_why_it_cannot_serve_gpu_memory_without_cuda():
    with AutoAgent("no-gpu", use_nixl=False) as agent:
        with pytest.raises(ValueError, match=r"no transport here serves cuda:0 memory: cuda_ipc"):
            agent.register(1 << 40, 4096, "cuda:0")


def test_available_kinds_per_device():
    assert available_kinds()[0] == "shm"
    assert "cuda_ipc" not in available_kinds("cpu")
    assert ("cuda_ipc" in available_kinds("cuda")) == HAS_CUDA


def test_nixl_registers_gpu_memory_as_vram_of_its_device():
    assert memory_type("cpu") == ("DRAM", 0)
    assert memory_type("cuda:2") == ("VRAM", 2)


def test_nixl_groups_a_read_by_memory_type_of_each_side():
    remote = RegionSet([RegionDesc(0, 100, "cuda:1"), RegionDesc(1000, 100, "cpu")])
    local = RegionSet([RegionDesc(5000, 300, "cuda:0")])
    groups = group_by_memory([(0, 5000, 10), (1000, 5100, 10), (50, 5200, 10)], remote, local)
    assert groups == {
        (("VRAM", 1), ("VRAM", 0)): [(0, 5000, 10), (50, 5200, 10)],
        (("DRAM", 0), ("VRAM", 0)): [(1000, 5100, 10)],
    }


def test_worker_accepts_cuda_ipc_transport():
    assert WorkerConfig(kv_transfer="cuda_ipc").kv_transfer == "cuda_ipc"


def test_metadata_with_an_unknown_device_is_refused():
    with AutoAgent("r", use_nixl=False) as reader:
        described = metadata_decoder.decode(reader.metadata())
        forged = msgspec.structs.replace(described, name="o", regions=[RegionDesc(0, 1, "tpu:0")])
        with pytest.raises(TransportUnavailable, match="device must be"):
            reader.add_remote(msgspec.msgpack.encode(forged))


def test_auto_drops_shm_for_memory_it_did_not_allocate_and_serves_it_over_tcp():
    # An engine's own KV tensors (vLLM's) are not in an shm segment.
    own = bytearray(4096)
    address = ctypes.addressof(ctypes.c_char.from_buffer(own))
    with AutoAgent("engine-owned", use_nixl=False) as owner, AutoAgent("r", use_nixl=False) as r:
        owner.register(address, len(own))
        remote = r.add_remote(owner.metadata())
        assert r.transport_of(remote) == "tcp"
        with pytest.raises(ValueError, match="shm was dropped"):
            owner.allocate(4096)
