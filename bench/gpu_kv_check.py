"""The KV transfer half of ``bench/gpu_check.py``: each GPU transport between two processes.

- ``cuda_ipc``: a spawned owner fills a 1 GiB GPU tensor from a seeded generator and registers
  it with a ``cuda_ipc`` agent; this process reads it with its own agent whole, as 4,096
  scattered 64 KiB blocks, and as single 64 KiB reads (bytes compared with the same generator's
  output; GB/s one-way, p50/p99 us), then kills the owner and expects ``RemoteUnavailable``.
- ``nixl_vram``: the same with NIXL agents on GPU memory (VRAM; owner with a progress thread),
  256 MiB, every read bounded by a timeout, where NIXL imports.
- ``worker_handoff``: this process builds a torch engine the way a worker does
  (``build_engine``, an ``auto`` agent, ``register(kv_region)``, ``RegionConnector``), prefills a
  1,000-token prompt and decodes one token; a spawned consumer builds the same engine, pulls
  the prompt's blocks into other block ids with ``RegionConnector.pull``, compares them byte
  for byte and decodes the same token from them. On a CPU machine this runs on the CPU (shm).
- ``vllm``: where vLLM imports and this tree has a vLLM engine, builds it on the GPU and
  registers its KV region with an ``auto`` agent.

Each check returns a flat dict (``<check>_ok`` is the verdict; ``<check>_skipped`` says why one
did not run) for gpu_check's table and JSON.
"""

import asyncio
import importlib.util
import queue
import statistics
import time
import traceback
from typing import Any

import torch
import torch.multiprocessing as mp

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
BLOCK_BYTES = 64 * KiB
HANDOFF_PROMPT_TOKENS = 1000  # not a multiple of the block size: the last block is partial


def _pattern(num_bytes: int, seed: int, device: str) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(
        0, 256, (num_bytes,), dtype=torch.uint8, device=device, generator=generator
    )


def _wait(outbox: Any, process: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return outbox.get(timeout=1.0)
        except queue.Empty:
            if not process.is_alive():
                raise RuntimeError(f"peer process exited with code {process.exitcode}") from None
    raise TimeoutError(f"no answer from the peer process in {timeout_s} s")


def _tensor_owner(kind: str, name: str, num_bytes: int, seed: int, outbox: Any, stop: Any) -> None:
    """The owner process: register a seeded GPU tensor, publish metadata, wait to be stopped."""
    from shared.kv_transfer import create_agent

    data = _pattern(num_bytes, seed, "cuda")
    torch.cuda.synchronize()
    agent = create_agent(kind, name, nixl_progress_thread=True)
    agent.register(data.data_ptr(), num_bytes, str(data.device))
    outbox.put((agent.metadata(), data.data_ptr()))
    stop.wait(600)
    agent.close()


async def _timed_read(agent: Any, remote: str, transfers: list[Any], timeout_s: float) -> float:
    started = time.perf_counter()
    async with asyncio.timeout(timeout_s):
        await agent.read(remote, transfers)
    return time.perf_counter() - started


async def _read_checks(
    agent: Any,
    remote: str,
    remote_base: int,
    expected: torch.Tensor,
    *,
    num_blocks: int,
    reps: int,
    timeout_s: float,
) -> dict[str, Any]:
    """Whole, scattered and small reads of the owner's tensor into a local one."""
    num_bytes = expected.numel()
    local = torch.zeros_like(expected)
    agent.register(local.data_ptr(), num_bytes, str(local.device))
    base = local.data_ptr()
    res: dict[str, Any] = {}
    whole = [(remote_base, base, num_bytes)]
    times = [await _timed_read(agent, remote, whole, timeout_s) for _ in range(reps + 2)][2:]
    res["whole_GBps"] = num_bytes / statistics.median(times) / 1e9
    res["whole_bytes_equal"] = bool(torch.equal(local, expected))
    local.zero_()
    perm = torch.randperm(num_bytes // BLOCK_BYTES, generator=torch.Generator().manual_seed(5))
    picked = perm[:num_blocks].tolist()
    scattered = [
        (remote_base + b * BLOCK_BYTES, base + i * BLOCK_BYTES, BLOCK_BYTES)
        for i, b in enumerate(picked)
    ]
    times = [await _timed_read(agent, remote, scattered, timeout_s) for _ in range(reps + 2)][2:]
    res[f"scattered_{num_blocks}x64KiB_GBps"] = (
        num_blocks * BLOCK_BYTES / statistics.median(times) / 1e9
    )
    got = local.view(-1, BLOCK_BYTES)[:num_blocks]
    want = expected.view(-1, BLOCK_BYTES)[torch.tensor(picked, device=expected.device)]
    res["scattered_bytes_equal"] = bool(torch.equal(got, want))
    small = [(remote_base, base, BLOCK_BYTES)]
    times = sorted([await _timed_read(agent, remote, small, timeout_s) for _ in range(202)][2:])
    res["read_64KiB_p50_us"] = times[len(times) // 2] * 1e6
    res["read_64KiB_p99_us"] = times[int(len(times) * 0.99)] * 1e6
    res["local_address"] = base
    return res


def check_tensor_transport(kind: str, num_bytes: int, num_blocks: int, reps: int) -> dict[str, Any]:
    """A GPU owner process and a reader here, both agents of ``kind``."""
    from shared.kv_transfer import RemoteUnavailable, create_agent

    ctx = mp.get_context("spawn")
    outbox, stop = ctx.Queue(), ctx.Event()
    owner = ctx.Process(
        target=_tensor_owner, args=(kind, f"check-{kind}-owner", num_bytes, 7, outbox, stop)
    )
    owner.start()
    res: dict[str, Any] = {}
    try:
        metadata, remote_base = _wait(outbox, owner, timeout_s=180.0)
        expected = _pattern(num_bytes, 7, "cuda")
        with create_agent(kind, f"check-{kind}-reader") as agent:
            remote = agent.add_remote(metadata)
            started = time.perf_counter()
            res |= asyncio.run(
                _read_checks(
                    agent,
                    remote,
                    remote_base,
                    expected,
                    num_blocks=num_blocks,
                    reps=reps,
                    timeout_s=60.0,
                )
            )
            res["total_s"] = time.perf_counter() - started
            owner.kill()
            owner.join(timeout=30)
            one = [(remote_base, res.pop("local_address"), 1)]
            try:
                asyncio.run(_timed_read(agent, remote, one, 30.0))
                res["dead_owner_refused"] = False
            except RemoteUnavailable:
                res["dead_owner_refused"] = True
            except Exception as exc:  # another error is still a refusal, but say which
                res["dead_owner_refused"] = f"{type(exc).__name__}: {exc}"[:80]
    finally:
        stop.set()
        owner.join(timeout=30)
        if owner.is_alive():
            owner.kill()
    res["ok"] = bool(
        res.get("whole_bytes_equal")
        and res.get("scattered_bytes_equal")
        and res.get("dead_owner_refused") is True
    )
    return res


# --- a worker's KV handoff (build_engine + auto agent + RegionConnector) ---------------------


def _handoff_config(device: str) -> Any:
    from shared.engine.config import EngineConfig

    return EngineConfig(
        engine="torch",
        device=device,
        dtype="bfloat16" if device.startswith("cuda") else "float32",
        num_kv_blocks=256,
        max_model_len=2048,
        max_num_batched_tokens=2048,
        torch_threads=1,
    )


def _build_worker(name: str, device: str) -> tuple[Any, Any, Any, Any]:
    """What ``services/worker/runtime.py`` does at start: agent, engine, register, connector."""
    from shared.engine.factory import build_engine
    from shared.engine.kv_connector import RegionConnector
    from shared.kv_transfer import create_agent
    from shared.tokenizer import Tokenizer

    config = _handoff_config(device)
    tokenizer = Tokenizer.load(config.tokenizer)
    agent = create_agent("auto", name, nixl_progress_thread=device.startswith("cuda"))
    built = build_engine(config, tokenizer, agent.allocate)
    region = built.engine.kv_region
    agent.register(region.address, region.size_bytes, region.device)
    return agent, built.engine.runner, region, RegionConnector(agent, region, config.block_size)


def _prefill(runner: Any, prompt: list[int], block_ids: list[int]) -> int:
    from proto.messages import RequestId, SamplingParams
    from shared.engine.scheduler import BatchPlan
    from shared.engine.sequence import Sequence

    seq = Sequence(RequestId("handoff"), prompt, SamplingParams(temperature=0.0, max_tokens=8))
    seq.block_table = block_ids
    result = runner.execute(BatchPlan([seq], [len(prompt)], 1, len(prompt)), 0.0)
    return int(result.token_ids[0])


def _decode(runner: Any, prompt: list[int], first: int, block_ids: list[int]) -> int:
    from proto.messages import RequestId, SamplingParams
    from shared.engine.scheduler import BatchPlan
    from shared.engine.sequence import Sequence

    seq = Sequence(
        RequestId("handoff"), [*prompt, first], SamplingParams(temperature=0.0, max_tokens=8)
    )
    seq.num_computed_tokens = len(prompt)
    seq.block_table = block_ids
    return int(runner.execute(BatchPlan([seq], [1], 0, 0), 0.0).token_ids[0])


def _blocks(runner: Any, block_ids: list[int]) -> bytes:
    cache = runner.kv_cache.view(runner.num_kv_blocks, -1).view(torch.uint8)
    return bytes(cache[torch.tensor(block_ids, device=cache.device)].cpu().numpy().tobytes())


def _handoff_consumer(device: str, offer: dict[str, Any], outbox: Any) -> None:
    """The decode worker: pull the prompt's blocks into its own ids, compare, decode."""
    try:
        from proto.messages import InstanceId
        from shared.engine.interface import Reservation
        from shared.engine.kv_connector import KVSource

        agent, runner, _, connector = _build_worker("gpu-check-decode", device)
        with agent:
            num = len(offer["descriptors"])
            block_ids = list(range(100, 100 + num))  # not the owner's ids
            source = KVSource(
                InstanceId("gpu-check-prefill"),
                offer["agent_name"],
                offer["metadata"],
                offer["descriptors"],
            )

            async def pull() -> float:
                started = time.perf_counter()
                async with asyncio.timeout(60):
                    await connector.pull(source, Reservation(block_ids, 0))
                return time.perf_counter() - started

            pull_s = asyncio.run(pull())
            transport = agent.transport_of(offer["agent_name"])
            same_bytes = _blocks(runner, block_ids) == offer["blocks"]
            token = _decode(runner, offer["prompt"], offer["first"], block_ids)
        outbox.put(
            {
                "transport": transport,
                "num_blocks": num,
                "block_bytes": runner.block_bytes,
                "pull_ms": pull_s * 1e3,
                "bytes_equal": same_bytes,
                "decode_token_equal": token == offer["second"],
            }
        )
    except Exception:
        outbox.put({"error": traceback.format_exc()[-600:]})


def check_worker_handoff(device: str) -> dict[str, Any]:
    """A prefill worker here, a decode worker spawned, both built as workers build them."""
    agent, runner, _, connector = _build_worker("gpu-check-prefill", device)
    with agent:
        prompt = [(7919 * i) % 5000 + 10 for i in range(HANDOFF_PROMPT_TOKENS)]
        block_ids = list(range(-(-len(prompt) // runner.block_size)))
        first = _prefill(runner, prompt, block_ids)
        second = _decode(runner, prompt, first, block_ids)  # writes slot 1000 too
        offer = {
            "agent_name": agent.name,
            "metadata": agent.metadata(),
            "descriptors": connector.describe(block_ids),
            "prompt": prompt,
            "first": first,
            "second": second,
            "blocks": _blocks(runner, block_ids),
        }
        ctx = mp.get_context("spawn")
        outbox = ctx.Queue()
        consumer = ctx.Process(target=_handoff_consumer, args=(device, offer, outbox))
        consumer.start()
        try:
            res: dict[str, Any] = _wait(outbox, consumer, timeout_s=300.0)
        finally:
            consumer.join(timeout=30)
            if consumer.is_alive():
                consumer.kill()
    res["kv_device"] = str(runner.kv_cache.device)
    res["ok"] = bool(res.get("bytes_equal") and res.get("decode_token_equal"))
    return res


# --- vLLM (another engineer's engine; called only where present) -----------------------------


def _greedy_tokens(engine: Any, prompt: list[int], num_tokens: int, timeout_s: float) -> list[int]:
    """Run one greedy request through an ``Engine`` (``add_request``/``step``) to its end."""
    from proto.messages import RequestId, SamplingParams
    from shared.engine.interface import EngineRequest

    sampling = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    engine.add_request(EngineRequest(RequestId("gpu-check"), prompt, sampling))
    tokens: list[int] = []
    deadline = time.monotonic() + timeout_s
    while engine.has_unfinished() and time.monotonic() < deadline:
        for output in engine.step().outputs:
            tokens += output.new_token_ids
    return tokens


def check_vllm() -> dict[str, Any]:
    """Build the vLLM engine on the GPU as a worker would, generate greedy tokens, compare them
    with the torch engine's on the same random model (for information), and register its KV
    region with an ``auto`` agent where it offers one."""
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not installed"}
    from shared.engine import config as engine_config

    if "vllm" not in engine_config.ENGINE_KINDS:
        return {"skipped": "this tree has no vllm engine (shared/engine/vllm_engine.py)"}
    from shared.engine.factory import build_engine
    from shared.kv_transfer import create_agent
    from shared.tokenizer import Tokenizer

    torch.cuda.empty_cache()  # vLLM sizes its cache from the memory free now
    config = engine_config.EngineConfig(
        engine="vllm", device="cuda", dtype="bfloat16", num_kv_blocks=1024, max_model_len=2048
    )
    tokenizer = Tokenizer.load(config.tokenizer)
    prompt = [(7919 * i) % 5000 + 10 for i in range(100)]
    started = time.perf_counter()
    built = build_engine(config, tokenizer)
    res: dict[str, Any] = {"build_s": time.perf_counter() - started}
    try:
        started = time.perf_counter()
        tokens = _greedy_tokens(built.engine, prompt, 16, timeout_s=120.0)
        res["generate_16_s"] = time.perf_counter() - started
        res["num_tokens"] = len(tokens)
        region = built.engine.kv_region
        res["kv_region"] = region.device if region is not None else "none"
        if region is not None:
            with create_agent("auto", "gpu-check-vllm", nixl_progress_thread=True) as agent:
                agent.register(region.address, region.size_bytes, region.device)
                res["kv_registered_bytes"] = region.size_bytes
    finally:
        built.engine.close()
    torch_config = engine_config.EngineConfig(
        engine="torch", device="cuda", dtype="bfloat16", num_kv_blocks=1024, max_model_len=2048
    )
    reference = _greedy_tokens(build_engine(torch_config, tokenizer).engine, prompt, 16, 120.0)
    res["tokens_match_torch"] = tokens == reference  # information: kernels differ in bf16
    res["ok"] = len(tokens) == 16
    return res


def run_checks(is_cuda: bool, *, reps: int) -> dict[str, Any]:
    """Every check that applies here, each guarded: one failing does not hide the others."""
    from shared.kv_transfer import cuda_ipc_status, nixl_status

    checks: dict[str, Any] = {}
    ipc_ok, ipc_why = cuda_ipc_status()
    checks["cuda_ipc"] = (
        (lambda: check_tensor_transport("cuda_ipc", GiB, 4096, reps)) if ipc_ok else ipc_why
    )
    nixl_ok, nixl_why = nixl_status()
    checks["nixl_vram"] = (
        (lambda: check_tensor_transport("nixl", 256 * MiB, 1024, reps))
        if nixl_ok and is_cuda
        else (nixl_why or "needs CUDA")
    )
    checks["worker_handoff"] = lambda: check_worker_handoff("cuda" if is_cuda else "cpu")
    checks["vllm"] = check_vllm if is_cuda else "needs CUDA"
    res: dict[str, Any] = {}
    for name, check in checks.items():
        if isinstance(check, str):
            res[f"{name}_skipped"] = check
            continue
        started = time.perf_counter()
        try:
            out = check()
        except Exception as exc:
            out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
            traceback.print_exc()
        res |= {f"{name}_{key}": value for key, value in out.items()}
        res[f"{name}_check_s"] = time.perf_counter() - started
    return res
