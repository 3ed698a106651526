"""The CUDA IPC transport: what runs without a GPU (metadata, peer checks, copy planning, clear
errors), and, under the gpu marker, reads within one process."""

import asyncio
import contextlib
import ctypes
import os
import random
import re

import msgspec
import pytest
import torch

from shared.kv_transfer import (
    AutoAgent,
    RangeNotRegistered,
    TransportUnavailable,
    create_agent,
    cuda_ipc,
    cuda_ipc_status,
)
from shared.kv_transfer.cuda_driver import LIBRARY, load_driver
from shared.kv_transfer.cuda_ipc import check_same_machine, is_same_process
from shared.kv_transfer.device_copy import copy_bytes, plan, row_bytes, row_indices
from shared.kv_transfer.metadata import (
    AgentMetadata,
    CudaIpcAllocation,
    CudaIpcEndpoint,
    RegionDesc,
    boot_id,
    encoder,
    metadata_decoder,
    pid_namespace,
)

HAS_CUDA = torch.cuda.is_available()
KiB = 1024


def libcuda_loads() -> bool:
    try:
        ctypes.CDLL(LIBRARY)
    except OSError:
        return False
    return True


def gpu_metadata(*, boot: str, pid: int = 1234, name: str = "owner") -> AgentMetadata:
    endpoint = CudaIpcEndpoint(
        boot_id=boot,
        pid=pid,
        pid_namespace=pid_namespace(),
        start_time=1,
        allocations=[CudaIpcAllocation(0x7F0000000000, 2 << 20, "GPU-0000", bytes(64))],
    )
    return AgentMetadata(
        kind="cuda_ipc",
        name=name,
        host="gpu-node-1",
        regions=[RegionDesc(0x7F0000001000, 1 << 20, "cuda:0")],
        cuda_ipc=endpoint,
    )


def test_cuda_ipc_metadata_round_trips_as_plain_msgpack():
    described = gpu_metadata(boot=boot_id())
    data = encoder.encode(described)
    assert metadata_decoder.decode(data) == described
    plain = msgspec.msgpack.decode(data)
    assert plain["regions"] == [[0x7F0000001000, 1 << 20, "cuda:0"]]
    assert plain["cuda_ipc"]["allocations"][0][3] == bytes(64)


def test_metadata_without_cuda_ipc_still_decodes():
    old = encoder.encode(AgentMetadata(kind="shm", name="old", host="h"))
    assert metadata_decoder.decode(old).cuda_ipc is None


def test_cuda_ipc_peer_on_another_machine_is_refused():
    other = gpu_metadata(boot="00000000-0000-0000-0000-000000000000")
    with pytest.raises(TransportUnavailable, match="another machine") as info:
        check_same_machine(other)
    assert info.value.remote_name == "owner"


def test_cuda_ipc_peer_without_endpoint_is_refused():
    plain = AgentMetadata(kind="shm", name="cpu-owner", host="h")
    with pytest.raises(TransportUnavailable, match="no cuda_ipc endpoint"):
        check_same_machine(plain)


def test_same_machine_peer_is_accepted_and_this_process_recognised():
    here = gpu_metadata(boot=boot_id(), pid=os.getpid())
    endpoint = check_same_machine(here)
    assert is_same_process(endpoint)
    assert not is_same_process(check_same_machine(gpu_metadata(boot=boot_id(), pid=1)))


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here")
def test_cuda_ipc_agent_without_cuda_says_why():
    ok, why = cuda_ipc_status()
    assert not ok
    assert "CUDA" in why or "torch" in why
    with pytest.raises(TransportUnavailable, match=re.escape(why)):
        create_agent("cuda_ipc", "no-gpu")


@pytest.mark.skipif(libcuda_loads(), reason="the NVIDIA driver is installed here")
def test_driver_without_libcuda_says_why():
    with pytest.raises(TransportUnavailable, match=r"libcuda\.so\.1 cannot be loaded"):
        load_driver()


# --- copy planning (torch on the CPU runs the same code as on a GPU) --------------------------


def test_row_indices_concatenate_runs():
    got = row_indices(torch, [5, 0, 9], [2, 3, 1])
    assert got.tolist() == [5, 6, 0, 1, 2, 9]


def test_plan_gathers_many_small_blocks_and_launches_long_copies_alone():
    blocks = [(i * 4 * KiB, (63 - i) * 4 * KiB, 4 * KiB) for i in range(16)]
    long = (1 << 30, 0, 8 << 20)
    direct, gathers = plan([*blocks, long])
    assert direct == [long]
    assert gathers == [blocks]
    assert row_bytes(blocks) == 4 * KiB
    assert plan(blocks[:3]) == (blocks[:3], [])  # a handful: launched one by one
    shifted = [(dst + 96, src + 1000, n) for dst, src, n in blocks]
    assert row_bytes(shifted) == 4 * KiB  # rows start at the lowest offset of each side
    odd = [(i * 100, i * 300, 100) for i in range(16)]
    assert plan(odd) == (odd, [])  # rows of 100 bytes: not worth a gather


@pytest.mark.parametrize(("num_blocks", "skew"), [(3, 0), (64, 0), (64, 192)])
def test_copy_bytes_moves_scattered_blocks_exactly(num_blocks, skew):
    block = 2 * KiB
    rng = random.Random(num_blocks)
    source = torch.randint(0, 256, (skew + num_blocks * block,), dtype=torch.uint8)
    destination = torch.zeros(2 * num_blocks * block, dtype=torch.uint8)
    targets = rng.sample(range(2 * num_blocks), num_blocks)
    copies = [(t * block, skew + s * block, block) for s, t in enumerate(targets)]
    copy_bytes(torch, destination, source, copies)
    for s, t in enumerate(targets):
        start = skew + s * block
        assert torch.equal(destination[t * block : (t + 1) * block], source[start : start + block])
    untouched = set(range(2 * num_blocks)) - set(targets)
    assert all(int(destination[u * block : (u + 1) * block].sum()) == 0 for u in untouched)


# --- on a GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
async def test_cuda_ipc_reads_blocks_of_an_agent_in_this_process():
    num_blocks, block = 64, 16 * KiB
    owned = torch.randint(0, 256, (num_blocks * block,), dtype=torch.uint8, device="cuda")
    local = torch.zeros_like(owned)
    with (
        create_agent("cuda_ipc", "gpu-owner") as owner,
        create_agent("cuda_ipc", "gpu-reader") as reader,
    ):
        owner.register(owned.data_ptr(), owned.numel(), str(owned.device))
        reader.register(local.data_ptr(), local.numel(), str(local.device))
        remote = reader.add_remote(owner.metadata())
        order = list(reversed(range(num_blocks)))
        transfers = [
            (owned.data_ptr() + b * block, local.data_ptr() + i * block, block)
            for i, b in enumerate(order)
        ]
        async with asyncio.timeout(30):
            await reader.read(remote, transfers)
        assert torch.equal(local.view(num_blocks, block), owned.view(num_blocks, block).flip(0))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_torch_worker_cuda_cache_registers_with_the_default_agent():
    from shared.engine.config import EngineConfig
    from shared.engine.factory import build_engine
    from shared.tokenizer import Tokenizer

    config = EngineConfig(engine="torch", device="cuda", num_kv_blocks=64, max_model_len=1024)
    with create_agent("auto", "gpu-worker") as agent:
        built = build_engine(config, Tokenizer.load(config.tokenizer), agent.allocate)
        region = built.engine.kv_region
        assert region is not None
        assert region.device.startswith("cuda:")
        agent.register(region.address, region.size_bytes, region.device)
        described = metadata_decoder.decode(agent.metadata())
        assert described.cuda_ipc is not None
        assert described.regions == [RegionDesc(region.address, region.size_bytes, region.device)]


# --- the agent's own logic, on host memory posing as a GPU (the only fake: the GPU) -----------


class FakeDriver:
    """The CUDA driver calls the agent makes, answered for host buffers of this process: an
    allocation is a buffer, its handle its index, and "opening" it returns its address."""

    def __init__(self, buffers):
        self.buffers = buffers  # [(address, size)]
        self.num_devices = 1
        self.opened = []

    def allocation_of(self, address, index):
        for base, size in self.buffers:
            if base <= address < base + size:
                return base, size
        raise ValueError(f"address {address:#x} is not memory of cuda:{index}")

    def export(self, base, index):
        return [b for b, _ in self.buffers].index(base).to_bytes(64, "little")

    def device_uuid(self, index):
        return "GPU-fake"

    def open(self, handle, index):
        self.opened.append(handle)
        return self.buffers[int.from_bytes(handle, "little")][0]

    def close(self, handle, index):
        self.opened.remove(handle)


class HostTorch:
    """torch, with the CUDA calls the agent makes answered on the CPU."""

    class cuda:  # stands in for the torch.cuda module
        device = staticmethod(lambda index: contextlib.nullcontext())
        stream = staticmethod(lambda stream: contextlib.nullcontext())

        class Stream:
            def __init__(self, device):
                self.device = device

            def synchronize(self):
                pass

        class Event:
            def record(self, stream):
                pass

            def query(self):
                return True

            def synchronize(self):
                pass

    @staticmethod
    def as_tensor(pointer):
        interface = pointer.__cuda_array_interface__
        (num_bytes,), (address, _) = interface["shape"], interface["data"]
        return torch.frombuffer(
            (ctypes.c_uint8 * num_bytes).from_address(address), dtype=torch.uint8
        )

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.mark.parametrize("same_process", [True, False])
async def test_cuda_ipc_agent_reads_scattered_blocks_through_its_mappings(
    monkeypatch, same_process
):
    num_blocks, block = 32, 4 * KiB
    owned = ctypes.create_string_buffer(random.Random(1).randbytes(num_blocks * block))
    local = ctypes.create_string_buffer(num_blocks * block)
    buffers = [(ctypes.addressof(b), len(b)) for b in (owned, local)]
    driver = FakeDriver(buffers)
    monkeypatch.setattr(cuda_ipc, "load_driver", lambda: driver)
    monkeypatch.setattr(cuda_ipc, "_load_torch", HostTorch)
    monkeypatch.setattr(cuda_ipc, "is_same_process", lambda endpoint: same_process)
    with cuda_ipc.CudaIpcAgent("owner") as owner, cuda_ipc.CudaIpcAgent("reader") as reader:
        owner.register(buffers[0][0] + block, (num_blocks - 1) * block, "cuda:0")
        reader.register(buffers[1][0], num_blocks * block, "cuda:0")
        described = metadata_decoder.decode(owner.metadata())
        assert described.cuda_ipc.allocations[0].address == buffers[0][0]  # the whole buffer
        remote = reader.add_remote(owner.metadata())
        assert len(driver.opened) == (0 if same_process else 1)
        order = random.Random(2).sample(range(1, num_blocks), num_blocks - 1)
        transfers = [
            (buffers[0][0] + b * block, buffers[1][0] + i * block, block)
            for i, b in enumerate(order)
        ]
        async with asyncio.timeout(10):
            await reader.read(remote, transfers)
        for i, b in enumerate(order):
            assert local.raw[i * block : (i + 1) * block] == owned.raw[b * block : (b + 1) * block]
        with pytest.raises(RangeNotRegistered):  # block 0 was not registered by the owner
            await reader.read(remote, [(buffers[0][0], buffers[1][0], block)])
    assert driver.opened == []  # close unmapped every handle


async def test_auto_reads_gpu_memory_over_cuda_ipc_and_refuses_another_machine(monkeypatch):
    num_blocks, block = 16, 4 * KiB
    owned = ctypes.create_string_buffer(random.Random(4).randbytes(num_blocks * block))
    local = ctypes.create_string_buffer(num_blocks * block)
    buffers = [(ctypes.addressof(b), len(b)) for b in (owned, local)]
    monkeypatch.setattr(cuda_ipc, "load_driver", lambda: FakeDriver(buffers))
    monkeypatch.setattr(cuda_ipc, "_load_torch", HostTorch)
    with AutoAgent("owner", use_nixl=False) as owner, AutoAgent("reader", use_nixl=False) as reader:
        owner.register(buffers[0][0], buffers[0][1], "cuda:0")
        reader.register(buffers[1][0], buffers[1][1], "cuda:0")
        described = metadata_decoder.decode(owner.metadata())
        assert described.cuda_ipc is not None
        assert described.regions == [RegionDesc(buffers[0][0], buffers[0][1], "cuda:0")]
        elsewhere = msgspec.structs.replace(
            described,
            name="far",
            cuda_ipc=msgspec.structs.replace(described.cuda_ipc, boot_id="another-boot"),
        )
        with pytest.raises(TransportUnavailable, match="another machine"):
            reader.add_remote(encoder.encode(elsewhere))
        remote = reader.add_remote(owner.metadata())
        assert reader.transport_of(remote) == "cuda_ipc"
        transfers = [
            (buffers[0][0] + b * block, buffers[1][0] + b * block, block) for b in range(0, 16, 2)
        ]
        async with asyncio.timeout(10):
            await reader.read(remote, transfers)
        for b in range(0, 16, 2):
            assert local.raw[b * block : (b + 1) * block] == owned.raw[b * block : (b + 1) * block]
