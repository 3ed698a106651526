"""GPU check of the torch runner: step times of a ~1B Llama and a same-GPU KV handoff.

On a CUDA machine it builds a random Llama-3.2-1B-shaped model in bf16 (hidden 2048, 16 layers,
32 query / 8 KV heads, MLP 8192, vocabulary 128,256, tied head: 1.24B parameters, and per token
the same matmuls as the 1.5B untied model of ``../shared/gpu/probe.py``) on ``TorchRunner``'s
paged cache, and reports the median measured ``execute`` time of

- a 2,048-token prefill;
- a decode step at batch 1, 32 and 128, context 1,024 (eager, no CUDA graph);
- the batch-128 decode step sharing its step with the 2,048-token prefill;
- a KV handoff: a second process (spawned) opens the runner's KV cache through CUDA IPC
  (``torch.multiprocessing``) and copies it into its own tensor, whole and as scattered blocks;
- the KV transports (``gpu_kv_check.py``): the ``cuda_ipc`` agent between two processes, NIXL
  on GPU memory where NIXL imports, a torch worker's KV handoff on the GPU through the worker's
  own path (``build_engine``, the ``auto`` agent, ``RegionConnector.pull``; the decode side
  must decode the same token from the pulled blocks), and a vLLM hook where vLLM imports.

It compares them with the H200 figures in ``../shared/gpu/README.md``. Without CUDA it says
so, runs the same code on a small model on the CPU (one thread; the cache shared through
shared memory instead of CUDA IPC; the worker handoff over shm; the GPU-only transport checks
reported as skipped, with the reason) and exits 0, so the script is checked on any machine. It
exits non-zero when a check that ran copied wrong bytes or decoded another token.

    .venv/bin/python bench/gpu_check.py [--json out.json] [--skip-steps]

The device image lacks msgspec (``proto``): carry its wheel there (docs/gpu.md).
"""

import argparse
import json
import queue
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.gpu_kv_check import run_checks
from proto.messages import RequestId, SamplingParams
from shared.engine.checkpoint import random_state_dict
from shared.engine.model import LlamaModel, ModelConfig
from shared.engine.scheduler import BatchPlan
from shared.engine.sequence import Sequence
from shared.engine.torch_runner import TorchRunner

# ../shared/gpu/README.md: one H200, PyTorch 2.11, 1.5B Llama-like model, bf16, eager.
REFERENCE_H200 = {
    "prefill_2048_ms": 10.1,
    "decode_b1_ctx1024_ms": 4.92,
    "decode_b32_ctx1024_ms": 4.76,
    "decode_b128_ctx1024_ms": 4.83,
    "decode_b128_with_prefill_2048_ms": 13.38,
    "ipc_copy_GBps_rw": 4234.0,
    "ipc_blocks_GBps_rw": 1252.0,  # README: in-process gather/scatter of 64 KiB blocks
    "cuda_ipc_whole_GBps": 2089.0,  # README: raw CUDA IPC copy, one-way, beside the NIXL runs
    "nixl_vram_whole_GBps": 0.52,  # README: NIXL READ of 1 GiB, same GPU, progress thread on
}
GREEDY = SamplingParams(temperature=0.0, max_tokens=1 << 20)


@dataclass(frozen=True, slots=True)
class Shape:
    """What to build and measure on one kind of machine."""

    config: ModelConfig
    device: str
    dtype: torch.dtype
    prefill_tokens: int
    decode_batches: tuple[int, ...]
    context: int
    block_size: int = 16
    reps: int = 10
    num_handoff_blocks: int = 1024


GPU_SHAPE = Shape(
    ModelConfig(
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        intermediate_size=8192,
        vocab_size=128256,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "cuda",
    torch.bfloat16,
    prefill_tokens=2048,
    decode_batches=(1, 32, 128),
    context=1024,
)
CPU_SHAPE = Shape(
    ModelConfig(),  # the default small model
    "cpu",
    torch.float32,
    prefill_tokens=512,
    decode_batches=(1, 32),
    context=512,
    reps=5,
    num_handoff_blocks=256,
)


class Blocks:
    """Hands out consecutive block ids (the benchmark needs no free list)."""

    def __init__(self) -> None:
        self.next_id = 0

    def take(self, num_tokens: int, block_size: int) -> list[int]:
        n = -(-num_tokens // block_size)
        self.next_id += n
        return list(range(self.next_id - n, self.next_id))


def make_seq(
    name: str, num_tokens: int, num_computed: int, blocks: Blocks, shape: Shape
) -> Sequence:
    vocab = shape.config.vocab_size
    seq = Sequence(
        RequestId(name), [(7919 * i + len(name)) % vocab for i in range(num_tokens)], GREEDY
    )
    seq.num_computed_tokens = num_computed
    seq.block_table = blocks.take(num_tokens, shape.block_size)
    return seq


def median_ms(runner: TorchRunner, plan: BatchPlan, reps: int) -> float:
    """Median measured step time; the plan is re-run as is (its KV is rewritten in place)."""
    for _ in range(2):
        runner.execute(plan, 0.0)
    return statistics.median(runner.execute(plan, 0.0).duration_s for _ in range(reps)) * 1e3


def measure_steps(shape: Shape) -> tuple[TorchRunner, dict[str, Any]]:
    c = shape.config
    bs = shape.block_size
    max_batch = max(shape.decode_batches)
    num_blocks = -(-shape.prefill_tokens // bs) + max_batch * -(-(shape.context + 1) // bs)
    num_blocks = max(num_blocks, shape.num_handoff_blocks)
    started = time.perf_counter()
    state = random_state_dict(c, 0, device=shape.device, dtype=shape.dtype)
    model = LlamaModel(c, state, device=shape.device, dtype=shape.dtype)
    del state
    threads = 1 if shape.device == "cpu" else None
    runner = TorchRunner(model, num_kv_blocks=num_blocks, block_size=bs, num_threads=threads)
    res: dict[str, Any] = {
        "num_parameters": model.num_parameters,
        "build_s": time.perf_counter() - started,
        "kv_block_bytes": runner.block_bytes,
        "num_kv_blocks": num_blocks,
    }
    blocks = Blocks()
    n = shape.prefill_tokens
    prefill = make_seq("prefill", n, 0, blocks, shape)
    res[f"prefill_{n}_ms"] = ms = median_ms(runner, BatchPlan([prefill], [n], 1, n), shape.reps)
    layer_params = sum(t.numel() for layer in model.layers for t in (layer.qkv, layer.o))
    layer_params += sum(layer.gate_up.numel() + layer.down.numel() for layer in model.layers)
    res[f"prefill_{n}_layer_matmul_TFLOPs"] = 2 * layer_params * n / ms / 1e9
    decodes = [
        make_seq(f"d{i}", shape.context + 1, shape.context, blocks, shape) for i in range(max_batch)
    ]
    for b in shape.decode_batches:
        plan = BatchPlan(decodes[:b], [1] * b, 0, 0)
        res[f"decode_b{b}_ctx{shape.context}_ms"] = ms = median_ms(runner, plan, shape.reps)
        res[f"decode_b{b}_tok_per_s"] = b / ms * 1e3
    mixed = BatchPlan([prefill, *decodes], [n] + [1] * max_batch, 1, n)
    res[f"decode_b{max_batch}_with_prefill_{n}_ms"] = median_ms(runner, mixed, shape.reps)
    return runner, res


def _handoff_consumer(inbox: Any, outbox: Any, reps: int) -> None:
    """The receiving worker: map the producer's cache (CUDA IPC or shared memory), then copy
    it whole and as scattered blocks into a tensor of its own."""
    src, block_ids = inbox.get()
    dst = torch.empty_like(src)
    ids = block_ids.to(src.device)

    def timed(copy: Any) -> float:
        for _ in range(2):
            copy()
        if src.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            copy()
        if src.is_cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / reps

    whole_s = timed(lambda: dst.copy_(src))
    blocks_s = timed(lambda: dst.index_copy_(0, ids, src.index_select(0, ids)))
    block_bytes = src.shape[1]
    outbox.put(
        {
            "ipc_copy_GBps_rw": 2 * src.numel() / whole_s / 1e9,
            "ipc_blocks_GBps_rw": 2 * ids.numel() * block_bytes / blocks_s / 1e9,
            "ipc_num_blocks_copied": ids.numel(),
            "ipc_ok": bool(torch.equal(dst.index_select(0, ids), src.index_select(0, ids))),
        }
    )


def measure_handoff(runner: TorchRunner, shape: Shape) -> dict[str, Any]:
    cache = runner.kv_cache.view(runner.num_kv_blocks, -1).view(torch.uint8)  # [blocks, bytes]
    cache.random_(0, 256, generator=torch.Generator(device=cache.device).manual_seed(1))
    if not cache.is_cuda:
        cache.share_memory_()  # type: ignore[no-untyped-call]  # unannotated in torch
    perm = torch.randperm(runner.num_kv_blocks, generator=torch.Generator().manual_seed(2))
    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    consumer = ctx.Process(target=_handoff_consumer, args=(inbox, outbox, shape.reps))
    started = time.perf_counter()
    consumer.start()
    try:
        inbox.put((cache, perm[: shape.num_handoff_blocks]))
        res = _wait_for_result(outbox, consumer, timeout_s=180.0)
    finally:
        consumer.join(timeout=30)
        if consumer.is_alive():
            consumer.kill()
    res["ipc_total_s"] = time.perf_counter() - started
    res["ipc_cache_bytes"] = cache.numel()
    res["ipc_transport"] = "CUDA IPC" if cache.is_cuda else "CPU shared memory"
    return res


def _wait_for_result(outbox: Any, consumer: Any, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result: dict[str, Any] = outbox.get(timeout=1.0)
            return result
        except queue.Empty:
            if not consumer.is_alive():
                code = consumer.exitcode
                raise RuntimeError(f"handoff consumer exited with code {code}") from None
    raise TimeoutError(f"no handoff result in {timeout_s} s")


def report(res: dict[str, Any], is_smoke: bool) -> None:
    ref_label = "H200 ref (README)" + (" *" if is_smoke else "")
    print(f"\n{'figure':42s} {'this run':>14s} {ref_label:>20s}")
    for key, value in res.items():
        if not isinstance(value, float | int) or isinstance(value, bool):
            print(f"{key:42s} {value!s:>14s}")
            continue
        ref = None if is_smoke else REFERENCE_H200.get(key)
        ref_text = "" if ref is None else f"{ref:,.2f}"
        ratio = "" if ref is None else f"  ({value / ref:.2f}x)"
        text = f"{value:,d}" if isinstance(value, int) else f"{value:,.2f}"
        print(f"{key:42s} {text:>14s} {ref_text:>20s}{ratio}")
    if is_smoke:
        print(
            "\n* CPU smoke run: a small float32 model on one thread, not comparable with the H200"
        )
        print("  figures; the reference column is left empty. Run this on a CUDA machine.")
    else:
        print("\nReference: ../shared/gpu/README.md (H200, eager bf16, 1.5B model of the same")
        print("matmul shapes, dense cache). The runner adds paged-KV gathers and sampling; block")
        print("handoff copies whole KV blocks (all layers) between processes, the README's")
        print("64 KiB block figure is an in-process gather/scatter.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--skip-steps", action="store_true", help="only the KV transfer checks (no step times)"
    )
    args = parser.parse_args()
    is_smoke = not torch.cuda.is_available()
    if is_smoke:
        print("CUDA is not available: running the CPU smoke version (small model, one thread).")
    shape = CPU_SHAPE if is_smoke else GPU_SHAPE
    res: dict[str, Any] = {
        "device": "cpu" if is_smoke else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "dtype": str(shape.dtype).removeprefix("torch."),
        "smoke": is_smoke,
    }
    if not args.skip_steps:
        runner, steps = measure_steps(shape)
        res |= steps
        res |= measure_handoff(runner, shape)
        del runner, steps
    res |= run_checks(not is_smoke, reps=shape.reps)
    report(res, is_smoke)
    if args.json:
        args.json.write_text(
            json.dumps({"results": res, "reference_h200": REFERENCE_H200}, indent=1)
        )
    failed = [key for key, value in res.items() if key.endswith("_ok") and value is False]
    if failed:
        sys.exit("checks failed: " + ", ".join(failed))


if __name__ == "__main__":
    main()
