"""bench/frontend_floor.py serves whole streams, as the load client counts them."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_frontend_floor_streams_every_token_and_reports_them(tmp_path):
    out = tmp_path / "floor.json"
    args = ["--streams", "20", "--tokens-per-event", "3", "--max-tokens", "10", "--procs", "1"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "frontend_floor.py"), *args, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=True,
    )
    assert "tokens/event" in done.stdout
    (row,) = json.loads(out.read_text())["rows"]
    # Every stream ended with [DONE] and a usage event counting exactly max_tokens tokens
    # (10 = three events of 3 and one of 1).
    assert (row["completed"], row["errors"], row["short_streams"]) == (20, 0, 0)
    assert row["server_cpu_us_per_token"] > 0
    # One event every 2 ms carrying 3 tokens: about 0.67 ms a token, never less.
    assert row["tpot_p50_ms"] >= 0.6
