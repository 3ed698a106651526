"""bench/sim_step.py runs the sim engine alone and counts each decode token once."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sim_step_bench_counts_every_decode_token(tmp_path):
    out = tmp_path / "sim_step.json"
    args = ["--seqs", "40", "--prompt-tokens", "20", "--max-tokens", "12", "--repeats", "1"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "sim_step.py"), *args, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "decode CPU us/token" in done.stdout
    run = json.loads(out.read_text())["runs"][0]
    # Every sequence's first token comes from a prefill step; the other 11 from decodes.
    assert run["decode_steps"] == 11
    assert run["decode_us_per_token"] > 0
