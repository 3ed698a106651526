"""baton-bench results document and table (pure)."""

import json

import pytest

from services.bench import plot
from services.bench.arrivals import build_stages
from services.bench.outcome import Kind, Objectives, Outcome
from services.bench.report import RunFacts, format_table, results_document


def _facts():
    return RunFacts(
        config={"rate": 2.0},
        model="baton-sim",
        started_at=1_700_000_000.0,
        wall_s=4.5,
        client_cpu_s=0.9,
        client_procs=1,
        cpu_s_by_second=[0.2, 0.2, 0.2, 0.2, 0.1],
    )


def _outcomes():
    def ok(index, due_s, stage, priority=None):
        return Outcome(index, stage, due_s, priority, due_s, Kind.OK, 200, 0.1, 0.01, 0.5, 10)

    return [
        ok(0, 0.1, 0, -1),
        ok(1, 1.2, 0),
        Outcome(2, 1, 2.1, 1, 2.1, Kind.SHED, 429, latency_s=0.003, retry_after_s=1.0),
        ok(3, 3.5, 1),
    ]


def test_results_document_has_stages_total_series_and_is_strict_json():
    stages = build_stages([(1.0, 2.0), (2.0, 2.0)])
    document = results_document(
        _facts(), stages, _outcomes(), Objectives.from_ms(ttft_ms=200, tpot_ms=None)
    )
    text = json.dumps(document, allow_nan=False)  # NaN became null
    assert json.loads(text)["model"] == "baton-sim"
    assert [s["label"] for s in document["stages"]] == ["1 req/s", "2 req/s"]
    assert [s["num_offered"] for s in document["stages"]] == [2, 2]
    assert document["total"]["num_good"] == 3
    assert document["total"]["num_shed"] == 1
    assert document["stages"][0]["shed_latency_p50_ms"] is None
    assert document["stage_boundaries_s"] == [0.0, 2.0, 4.0]
    assert document["time_series"]["offered"] == [1, 1, 1, 1]
    assert document["time_series"]["client_cpu_s"] == [0.2, 0.2, 0.2, 0.2, 0.1]
    assert list(document["by_priority"]) == ["none", "high", "low"]
    assert document["objectives"] == {"ttft_ms": 200.0, "tpot_ms": None}


def test_table_has_a_row_per_stage_a_total_and_the_client_cost():
    stages = build_stages([(1.0, 2.0), (2.0, 2.0)])
    document = results_document(_facts(), stages, _outcomes(), Objectives())
    lines = format_table(document).splitlines()
    assert lines[0].split()[:3] == ["stage", "offered/s", "completed"]
    assert lines[2].startswith("1 req/s")
    assert lines[3].startswith("2 req/s")
    assert lines[4].startswith("total")
    assert any("client CPU 0.9 s" in line for line in lines)
    assert any("objectives: none" in line for line in lines)


def test_plot_without_matplotlib_fails_before_the_run_with_a_hint(monkeypatch):
    monkeypatch.setattr(plot.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(plot.PlotUnavailable, match=r"pip install 'baton\[bench\]'"):
        plot.check_available()


def test_plot_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    stages = build_stages([(1.0, 2.0), (2.0, 2.0)])
    document = results_document(_facts(), stages, _outcomes(), Objectives.from_ms(200, 50))
    path = tmp_path / "plot.png"
    plot.draw(document, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_document_keeps_what_failed_requests_were_told():
    stages = build_stages([(1.0, 2.0)])
    failed = [
        Outcome(5, 0, 0.5, None, 0.5, Kind.HTTP_ERROR, 503, error="worker gone"),
        Outcome(6, 0, 0.6, None, 0.6, Kind.TIMEOUT, error="over 120.0 s"),
    ]
    document = results_document(_facts(), stages, [*_outcomes(), *failed], Objectives())
    samples = document["error_samples"]
    assert [(s["index"], s["kind"], s["status"], s["error"]) for s in samples] == [
        (5, Kind.HTTP_ERROR.value, 503, "worker gone"),
        (6, Kind.TIMEOUT.value, 0, "over 120.0 s"),
    ]
    assert results_document(_facts(), stages, _outcomes(), Objectives())["error_samples"] == []
