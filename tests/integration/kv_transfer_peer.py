"""The owner side of the KV transfer tests, run as its own process.

It allocates ``num_blocks * block_bytes`` with an agent of ``--kind`` (with ``--device cuda``:
a torch tensor on the GPU instead), fills it with ``random.Random(seed).randbytes``, registers
it, prints ``METADATA <base64>`` on stdout (NIXL logs there too, hence the prefix) and then
waits: ``close`` on stdin closes the agent, prints
``CLOSED`` and keeps the process alive until end of input (which also closes the agent). Run::

    python -m tests.integration.kv_transfer_peer --kind shm --name owner \
        --num-blocks 64 --block-bytes 4096 --seed 1
"""

import argparse
import base64
import ctypes
import random
import sys

from shared.kv_transfer import create_agent


def expected_bytes(num_bytes: int, seed: int) -> bytes:
    """What the owner's region holds."""
    return random.Random(seed).randbytes(num_bytes)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--num-blocks", type=int, required=True)
    parser.add_argument("--block-bytes", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    size = args.num_blocks * args.block_bytes
    agent = create_agent(args.kind, args.name)
    if args.device == "cpu":
        memory = agent.allocate(size)
        memory[:size] = expected_bytes(size, args.seed)
        address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        memory.release()
        agent.register(address, size)
    else:
        import torch

        data = bytearray(expected_bytes(size, args.seed))
        tensor = torch.frombuffer(data, dtype=torch.uint8).to(args.device)
        torch.cuda.synchronize()
        agent.register(tensor.data_ptr(), size, str(tensor.device))
    sys.stdout.write("METADATA " + base64.b64encode(agent.metadata()).decode() + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        if line.strip() == "close":
            break
    agent.close()
    agent.close()
    sys.stdout.write("CLOSED\n")
    sys.stdout.flush()
    sys.stdin.read()  # stay alive, closed, until the test lets go: a closed owner is not a dead one


if __name__ == "__main__":
    main()
