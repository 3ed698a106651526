"""bench/streams.py as the closing notes run it, small: its lean client against a live
cluster, from two client processes on their own source addresses."""

import asyncio
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "streams.py"


@pytest.mark.timeout(120)
async def test_streams_bench_completes_every_stream_and_counts_its_tokens(start_cluster, tmp_path):
    cluster = await start_cluster(num_workers=1)
    out = tmp_path / "streams.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT),
        "--url", cluster.url,
        "--streams", "40",
        "--client-procs", "2",
        "--max-tokens", "4",
        "--ramp-s", "0.5",
        "--json", str(out),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(90):
        stdout, _ = await proc.communicate()
    assert proc.returncode == 0, stdout.decode()[-2000:]
    assert "completed               40 / 40" in stdout.decode()
    result = json.loads(out.read_text())["results"]
    assert (result["num_completed"], result["num_errors"]) == (40, 0)
    assert result["num_short_streams"] == 0
    assert result["num_output_tokens"] == 40 * 4
    assert 0 < result["ttft_ms"]["p50"] <= result["ttft_ms"]["p99"]
    assert result["tpot_ms"]["p50"] > 0
    assert result["peak_open_streams"] >= 1
    assert result["client_cpu_s"] > 0
    # The kernel's counters, read for the whole machine: each client process opened at least
    # one connection (a finished stream's connection is reused) and sent on it.
    moved = result["tcp_counters_moved"]
    assert moved["TcpActiveOpens"] >= 2
    assert moved["TcpOutSegs"] > 40
    assert result["error_started_s"] == {}
