"""One suite for every KV transport: the owner runs in another process (kv_transfer_peer.py)."""

import asyncio
import base64
import ctypes
import os
import random
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgspec
import pytest

from shared.kv_transfer import (
    AutoAgent,
    RangeNotRegistered,
    RemoteUnavailable,
    TransferAgent,
    TransferError,
    TransportUnavailable,
    create_agent,
    nixl_status,
)
from shared.kv_transfer.metadata import AgentMetadata, RegionDesc, metadata_decoder
from tests.integration.kv_transfer_peer import expected_bytes

REPO = Path(__file__).resolve().parents[2]
KiB = 1024
MiB = 1024 * KiB
NIXL_MISSING = nixl_status()[1]  # "" when installed

KINDS = [
    "shm",
    "tcp",
    pytest.param("nixl", marks=pytest.mark.skipif(bool(NIXL_MISSING), reason=NIXL_MISSING)),
    "auto",
]


@dataclass
class Owner:
    process: asyncio.subprocess.Process
    metadata: bytes
    described: AgentMetadata
    seed: int

    @property
    def address(self) -> int:
        return self.described.regions[0].address

    @property
    def segment_names(self) -> list[str]:
        return [s.name for s in self.described.shm.segments] if self.described.shm else []

    async def close(self) -> None:
        """Close the owner's agent; the process stays alive until the test ends."""
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(b"close\n")
        await self.process.stdin.drain()
        async with asyncio.timeout(30):
            while (line := await self.process.stdout.readline()) != b"CLOSED\n":
                assert line, "owner exited before closing"

    async def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        async with asyncio.timeout(30):
            await self.process.wait()


@pytest.fixture
def owner_stderr(tmp_path: Path) -> Iterator[BinaryIO]:
    """Where owner processes write their logs, to show when one fails to start."""
    with open(tmp_path / "owners.stderr", "ab") as f:
        yield f


@asynccontextmanager
async def start_owner(
    kind: str,
    stderr: BinaryIO,
    *,
    num_blocks: int,
    block_bytes: int,
    seed: int = 1,
    device: str = "cpu",
) -> AsyncIterator[Owner]:
    name = f"owner-{uuid.uuid4().hex[:8]}"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.integration.kv_transfer_peer",
        *("--kind", kind, "--name", name, "--seed", str(seed)),
        *("--num-blocks", str(num_blocks), "--block-bytes", str(block_bytes)),
        *("--device", device),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
        cwd=REPO,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(60):
            while not (line := await process.stdout.readline()).startswith(b"METADATA "):
                assert line, f"owner {kind} exited at start; see {stderr.name}"
        metadata = base64.b64decode(line.split()[1])
        yield Owner(process, metadata, metadata_decoder.decode(metadata), seed)
    finally:
        if process.returncode is None:
            assert process.stdin is not None
            process.stdin.close()
            try:
                async with asyncio.timeout(30):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


@dataclass
class Reader:
    agent: TransferAgent
    memory: memoryview
    address: int


@pytest.fixture
def reader(request: pytest.FixtureRequest) -> Iterator[Reader]:
    """A reader agent of the test's kind with 64 MiB of registered local memory."""
    kind = request.node.callspec.params["kind"]
    agent = create_agent(kind, f"reader-{uuid.uuid4().hex[:8]}")
    memory = agent.allocate(64 * MiB)
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    agent.register(address, 64 * MiB)
    yield Reader(agent, memory, address)
    memory.release()
    agent.close()


def shm_names() -> set[str]:
    return set(os.listdir("/dev/shm"))


# --- behaviour shared by every transport ---------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_read_copies_scattered_blocks_exactly(kind, reader, owner_stderr):
    num_blocks, block_bytes = 64, 4 * KiB
    async with start_owner(
        kind, owner_stderr, num_blocks=num_blocks, block_bytes=block_bytes
    ) as owner:
        remote = reader.agent.add_remote(owner.metadata)
        assert remote == owner.described.name
        expected = expected_bytes(num_blocks * block_bytes, owner.seed)
        order = random.Random(7).sample(range(num_blocks), num_blocks)
        local_blocks = random.Random(8).sample(range(1000), num_blocks)
        transfers = [
            (owner.address + b * block_bytes, reader.address + lb * block_bytes, block_bytes)
            for b, lb in zip(order, local_blocks, strict=True)
        ]
        async with asyncio.timeout(30):
            await reader.agent.read(remote, transfers[:20])
            await reader.agent.read(remote, transfers[20:])
        for b, lb in zip(order, local_blocks, strict=True):
            got = reader.memory[lb * block_bytes : (lb + 1) * block_bytes]
            assert got == expected[b * block_bytes : (b + 1) * block_bytes], f"block {b}"


@pytest.mark.parametrize("kind", KINDS)
async def test_read_of_unregistered_range_raises(kind, reader, owner_stderr):
    async with start_owner(kind, owner_stderr, num_blocks=4, block_bytes=4 * KiB) as owner:
        remote = reader.agent.add_remote(owner.metadata)
        end = owner.address + 4 * 4 * KiB
        async with asyncio.timeout(30):
            with pytest.raises(RangeNotRegistered):
                await reader.agent.read(remote, [(end - KiB, reader.address, 2 * KiB)])
            with pytest.raises(RangeNotRegistered):
                await reader.agent.read(remote, [(owner.address, reader.address + 64 * MiB, 1)])
            with pytest.raises(TransferError):
                await reader.agent.read("nobody", [(owner.address, reader.address, 1)])
            await reader.agent.read(remote, [(owner.address, reader.address, 4 * KiB)])


@pytest.mark.parametrize("kind", KINDS)
async def test_read_from_dead_owner_raises_promptly(kind, reader, owner_stderr):
    async with start_owner(kind, owner_stderr, num_blocks=4, block_bytes=4 * KiB) as owner:
        remote = reader.agent.add_remote(owner.metadata)
        transfers = [(owner.address, reader.address, 4 * KiB)]
        async with asyncio.timeout(30):
            await reader.agent.read(remote, transfers)
        await owner.kill()
        async with asyncio.timeout(10):
            with pytest.raises(RemoteUnavailable):
                await reader.agent.read(remote, transfers)


@pytest.mark.parametrize("kind", KINDS)
async def test_read_from_closed_owner_raises(kind, reader, owner_stderr):
    async with start_owner(kind, owner_stderr, num_blocks=4, block_bytes=4 * KiB) as owner:
        remote = reader.agent.add_remote(owner.metadata)
        transfers = [(owner.address, reader.address, 4 * KiB)]
        async with asyncio.timeout(30):
            await reader.agent.read(remote, transfers)
        await owner.close()
        async with asyncio.timeout(10):
            with pytest.raises(RemoteUnavailable):
                await reader.agent.read(remote, transfers)


@pytest.mark.parametrize("kind", KINDS)
async def test_large_read_is_exact(kind, reader, owner_stderr):
    num_blocks, block_bytes = 16, 4 * MiB
    async with start_owner(
        kind, owner_stderr, num_blocks=num_blocks, block_bytes=block_bytes
    ) as owner:
        remote = reader.agent.add_remote(owner.metadata)
        async with asyncio.timeout(60):
            await reader.agent.read(remote, [(owner.address, reader.address, 64 * MiB)])
        assert reader.memory[: 64 * MiB] == expected_bytes(64 * MiB, owner.seed)


@pytest.mark.parametrize("kind", KINDS)
async def test_concurrent_reads_survive_cancelled_neighbours(kind, reader, owner_stderr):
    num_blocks, block_bytes = 64, 256 * KiB
    async with start_owner(
        kind, owner_stderr, num_blocks=num_blocks, block_bytes=block_bytes
    ) as owner:
        remote = reader.agent.add_remote(owner.metadata)
        expected = expected_bytes(num_blocks * block_bytes, owner.seed)

        def block_read(b: int) -> list[tuple[int, int, int]]:
            return [
                (owner.address + b * block_bytes, reader.address + b * block_bytes, block_bytes)
            ]

        async with asyncio.timeout(60):
            tasks = [
                asyncio.create_task(reader.agent.read(remote, block_read(b))) for b in range(32)
            ]
            await asyncio.sleep(0)
            for task in tasks[1::3]:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for b, result in enumerate(results):
                if not isinstance(result, asyncio.CancelledError):
                    assert result is None, f"block {b}: {result!r}"
                    got = reader.memory[b * block_bytes : (b + 1) * block_bytes]
                    assert got == expected[b * block_bytes : (b + 1) * block_bytes]
            reader.memory[: num_blocks * block_bytes] = bytes(num_blocks * block_bytes)
            await reader.agent.read(remote, [t for b in range(num_blocks) for t in block_read(b)])
        assert reader.memory[: num_blocks * block_bytes] == expected


@pytest.mark.parametrize("kind", KINDS)
async def test_reads_stay_in_step_under_random_cancellation(kind, reader, owner_stderr):
    """Deadlines that expire at any point of a pipelined read must not shift later reads."""
    num_blocks, block_bytes = 128, 64 * KiB
    async with start_owner(
        kind, owner_stderr, num_blocks=num_blocks, block_bytes=block_bytes
    ) as owner:
        remote = reader.agent.add_remote(owner.metadata)
        expected = expected_bytes(num_blocks * block_bytes, owner.seed)
        rng = random.Random(3)

        async def read_blocks(blocks: list[int], deadline_s: float | None) -> None:
            transfers = [
                (owner.address + b * block_bytes, reader.address + b * block_bytes, block_bytes)
                for b in blocks
            ]
            async with asyncio.timeout(deadline_s):
                await reader.agent.read(remote, transfers)

        for _ in range(60):
            order = rng.sample(range(num_blocks), num_blocks)
            cuts = sorted(rng.sample(range(1, num_blocks), 15))
            groups = [order[i:j] for i, j in zip([0, *cuts], [*cuts, num_blocks], strict=True)]
            deadlines = [rng.choice([None, None, 0, 1e-5, 1e-4, 5e-4, 1e-3]) for _ in groups]
            async with asyncio.timeout(20):  # a stream out of step hangs or raises here
                results = await asyncio.gather(
                    *(read_blocks(g, d) for g, d in zip(groups, deadlines, strict=True)),
                    return_exceptions=True,
                )
            for group, result in zip(groups, results, strict=True):
                if isinstance(result, TimeoutError):
                    continue
                assert result is None, repr(result)
                for b in group:
                    got = reader.memory[b * block_bytes : (b + 1) * block_bytes]
                    assert got == expected[b * block_bytes : (b + 1) * block_bytes]


@pytest.mark.parametrize("kind", KINDS)
async def test_close_is_idempotent_and_leaves_no_segments(kind, reader, owner_stderr):
    async with start_owner(kind, owner_stderr, num_blocks=4, block_bytes=4 * KiB) as owner:
        reader.agent.add_remote(owner.metadata)
        assert reader.agent.add_remote(owner.metadata) == owner.described.name  # cached
        local = metadata_decoder.decode(reader.agent.metadata())
        mine = [s.name for s in local.shm.segments] if local.shm else []
        assert set(mine) <= shm_names()
        await owner.close()
        assert not set(owner.segment_names) & shm_names()
    reader.memory.release()
    reader.agent.close()
    reader.agent.close()
    assert not set(mine) & shm_names()
    with pytest.raises(TransferError):
        await reader.agent.read(owner.described.name, [(owner.address, reader.address, 1)])


@pytest.mark.parametrize("kind", KINDS)
async def test_killed_owner_leaves_no_segments(kind, owner_stderr):
    async with start_owner(kind, owner_stderr, num_blocks=4, block_bytes=4 * KiB) as owner:
        await owner.kill()
        async with asyncio.timeout(10):  # the owner's resource tracker unlinks them
            while set(owner.segment_names) & shm_names():  # noqa: ASYNC110 (no event to await)
                await asyncio.sleep(0.05)


# --- transport choice and metadata ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "owner_kind", "transport"), [("auto", "auto", "shm"), ("auto", "tcp", "tcp")]
)
async def test_auto_picks_shm_on_this_host_and_falls_back(
    kind, owner_kind, transport, reader, owner_stderr
):
    async with start_owner(owner_kind, owner_stderr, num_blocks=4, block_bytes=4 * KiB) as owner:
        assert isinstance(reader.agent, AutoAgent)
        remote = reader.agent.add_remote(owner.metadata)
        assert reader.agent.transport_of(remote) == transport
        async with asyncio.timeout(30):
            await reader.agent.read(remote, [(owner.address, reader.address, 16 * KiB)])
        assert reader.memory[: 16 * KiB] == expected_bytes(16 * KiB, owner.seed)


@pytest.mark.parametrize("kind", ["tcp"])
async def test_tcp_server_refuses_range_missing_from_forged_metadata(kind, reader, owner_stderr):
    async with start_owner(kind, owner_stderr, num_blocks=4, block_bytes=4 * KiB) as owner:
        forged = msgspec.structs.replace(
            owner.described, regions=[RegionDesc(owner.address, 1 * MiB)]
        )
        remote = reader.agent.add_remote(msgspec.msgpack.encode(forged))
        async with asyncio.timeout(30):
            with pytest.raises(RangeNotRegistered, match="not registered"):
                await reader.agent.read(remote, [(owner.address + 64 * KiB, reader.address, 1)])
            await reader.agent.read(remote, [(owner.address, reader.address, 16 * KiB)])
        assert reader.memory[: 16 * KiB] == expected_bytes(16 * KiB, owner.seed)


@pytest.mark.parametrize("kind", ["shm", "tcp"])
def test_metadata_is_plain_msgpack(kind, reader):
    plain = msgspec.msgpack.decode(reader.agent.metadata())
    assert plain["kind"] == kind
    assert plain["regions"] == [[reader.address, 64 * MiB, "cpu"]]
    with pytest.raises(TransportUnavailable):
        reader.agent.add_remote(b"\x80\x04not msgpack")


def test_shm_agent_refuses_memory_it_did_not_allocate():
    with create_agent("shm", "solo") as agent:
        outside = ctypes.create_string_buffer(4096)
        with pytest.raises(ValueError, match="outside every segment"):
            agent.register(ctypes.addressof(outside), 4096)


def test_create_nixl_agent_without_nixl_is_unavailable():
    if not NIXL_MISSING:
        pytest.skip("NIXL is installed")
    with pytest.raises(TransportUnavailable):
        create_agent("nixl", "n")


# --- GPU memory (CUDA IPC on one machine) ---------------------------------------------------


def has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["cuda_ipc", "auto"])
async def test_gpu_reader_copies_scattered_blocks_from_another_process(kind, owner_stderr):
    import torch

    num_blocks, block_bytes = 256, 64 * KiB
    async with start_owner(
        kind, owner_stderr, num_blocks=num_blocks, block_bytes=block_bytes, device="cuda"
    ) as owner:
        assert owner.described.cuda_ipc is not None
        local = torch.zeros(num_blocks * block_bytes, dtype=torch.uint8, device="cuda")
        with create_agent(kind, f"reader-{uuid.uuid4().hex[:8]}") as agent:
            agent.register(local.data_ptr(), local.numel(), str(local.device))
            remote = agent.add_remote(owner.metadata)
            if isinstance(agent, AutoAgent):
                assert agent.transport_of(remote) == "cuda_ipc"
            order = random.Random(3).sample(range(num_blocks), num_blocks)
            transfers = [
                (owner.address + b * block_bytes, local.data_ptr() + i * block_bytes, block_bytes)
                for i, b in enumerate(order)
            ]
            async with asyncio.timeout(60):
                await agent.read(remote, transfers)
            expected = expected_bytes(num_blocks * block_bytes, owner.seed)
            got = local.cpu().numpy().tobytes()
            for i, b in enumerate(order):
                start = b * block_bytes
                assert (
                    got[i * block_bytes : (i + 1) * block_bytes]
                    == expected[start : start + block_bytes]
                ), f"block {b}"
            await owner.kill()
            with pytest.raises(RemoteUnavailable):
                async with asyncio.timeout(60):
                    await agent.read(remote, transfers[:1])


# --- pure helpers -----------------------------------------------------------------------------
