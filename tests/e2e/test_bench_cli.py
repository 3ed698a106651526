"""baton-bench as a user runs it: a short two-stage run against a live cluster."""

import asyncio
import json
import sys

import pytest


@pytest.mark.timeout(120)
async def test_bench_cli_reports_each_stage_of_a_short_run(start_cluster, tmp_path):
    cluster = await start_cluster(num_workers=1)
    out = tmp_path / "results.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.bench",
        "--url", cluster.url,
        "--stages", "4:1.5,8:1.5",
        "--prompt-tokens", "64",
        "--output-tokens", "8",
        "--slo-ttft-ms", "5000",
        "--send-slo",
        "--priority-mix", "high=0.5",
        "--client-procs", "2",
        "--metrics-url", f"{cluster.url}/metrics",
        "--watch-url", f"{cluster.url}/metrics",
        "--watch", "baton_frontend_output_tokens_total,baton_frontend_up",
        "--quiet",
        "--out", str(out),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(90):
        stdout, _ = await proc.communicate()
    assert proc.returncode == 0
    table = stdout.decode()
    assert table.splitlines()[2].startswith("4 req/s")
    document = json.loads(out.read_text())
    assert [s["label"] for s in document["stages"]] == ["4 req/s", "8 req/s"]
    for stage in document["stages"]:
        assert stage["num_completed"] > 0
        assert stage["num_errors"] == 0
        assert stage["ttft_p50_ms"] > 0
    assert document["total"]["num_good"] == document["total"]["num_completed"]
    assert set(document["by_priority"]) == {"none", "high"}
    assert any(line.startswith("baton_frontend") for line in document["server_metrics"]["after"])
    assert document["client_cpu_s"] > 0
    # Sampled each second during the run: the frontend's output tokens, and nothing else
    # (no baton_frontend_up exists). The counter grows while requests complete.
    watched = document["watched"]
    assert len(watched["t_s"]) >= 3
    assert watched["t_s"] == sorted(watched["t_s"])
    [name] = watched["series"]
    assert name.startswith("baton_frontend_output_tokens_total")
    tokens = watched["series"][name]
    assert len(tokens) == len(watched["t_s"])
    assert tokens == sorted(tokens)
    assert tokens[-1] > tokens[0]
