"""The simulated engine's own CPU per output token: its scheduler, block manager and runner
stepping a full decode batch in one process, with no bus, HTTP or modelled time.

It adds ``--seqs`` requests of ``--prompt-tokens`` each (distinct prompts, ``ignore_eos``),
steps until all have ``--max-tokens`` outputs, and reports the CPU (``time.process_time``)
of the decode steps alone (the prefill steps are timed apart) per output token, median of
``--repeats`` runs. The config is the sim's as ``baton up`` starts it (64-byte KV blocks of
16 tokens), with room for every sequence at once.

Run from the repository root::

    .venv/bin/python bench/sim_step.py
    .venv/bin/python bench/sim_step.py --seqs 5000 --json /tmp/sim_step.json
"""

import argparse
import json
import statistics
import time
from typing import Any

from proto.messages import RequestId, SamplingParams
from shared.engine.interface import EngineRequest
from shared.engine.sim import SimEngine, SimEngineConfig
from shared.engine.timing import TimingModel


def run_once(num_seqs: int, prompt_tokens: int, max_tokens: int) -> dict[str, float]:
    blocks_per_seq = -(-(prompt_tokens + max_tokens) // 16)
    engine = SimEngine(
        SimEngineConfig(
            num_kv_blocks=num_seqs * blocks_per_seq + 16,
            max_num_seqs=num_seqs,
            max_num_batched_tokens=8192,
            timing=TimingModel(speedup=float("inf")),
        )
    )
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    for i in range(num_seqs):
        prompt = [(i * 7919 + j * 104729) % 30000 + 10 for j in range(prompt_tokens)]
        engine.add_request(EngineRequest(RequestId(f"r{i}"), prompt, sampling))
    prefill_cpu = decode_cpu = 0.0
    num_decode_tokens = num_steps = 0
    while engine.has_unfinished():
        started = time.process_time()
        result = engine.step()
        spent = time.process_time() - started
        num_new = sum(len(out.new_token_ids) for out in result.outputs)
        if engine.stats().num_waiting or any(out.num_output_tokens <= 1 for out in result.outputs):
            prefill_cpu += spent  # a step that still prefills some prompts
        else:
            decode_cpu += spent
            num_decode_tokens += num_new
            num_steps += 1
    return {
        "decode_us_per_token": decode_cpu / max(1, num_decode_tokens) * 1e6,
        "decode_ms_per_step": decode_cpu / max(1, num_steps) * 1e3,
        "decode_steps": num_steps,
        "prefill_cpu_s": prefill_cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=2000)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    runs = [run_once(args.seqs, args.prompt_tokens, args.max_tokens) for _ in range(args.repeats)]
    summary: dict[str, Any] = {
        key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "decode_steps"
    }
    print(
        f"sim engine, {args.seqs} sequences, {args.prompt_tokens}-token prompts, "
        f"{args.max_tokens} tokens each; median of {args.repeats}"
    )
    print(f"{'decode CPU us/token':<24}{summary['decode_us_per_token']:>10.2f}")
    print(f"{'decode CPU ms/step':<24}{summary['decode_ms_per_step']:>10.2f}")
    print(f"{'prefill CPU s':<24}{summary['prefill_cpu_s']:>10.2f}")
    print("runs: " + ", ".join(f"{run['decode_us_per_token']:.2f}" for run in runs) + " us/token")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "summary": summary, "runs": runs}, f, indent=2)
        print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
