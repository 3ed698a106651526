"""The run's results as a JSON-ready document and as a table for the terminal (pure)."""

import dataclasses
import itertools
import math
from datetime import UTC, datetime
from typing import Any

from services.bench.arrivals import Stage
from services.bench.metrics import Summary, summarize, time_series
from services.bench.outcome import Objectives, Outcome, Verdict, verdict
from services.bench.workload import PRIORITIES

_PRIORITY_NAMES = {value: name for name, value in PRIORITIES.items()}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RunFacts:
    """What the report needs to know about the run besides its outcomes."""

    config: dict[str, Any]
    model: str
    started_at: float  # epoch seconds
    wall_s: float
    client_cpu_s: float
    client_procs: int
    cpu_s_by_second: list[float]
    metrics_before: list[str] = dataclasses.field(default_factory=list)
    metrics_after: list[str] = dataclasses.field(default_factory=list)
    stopped_s: float | None = None  # stopped early (Ctrl-C) this far into the schedule


def json_safe(value: Any) -> Any:
    """NaN and infinities become ``None`` (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def stage_summaries(
    outcomes: list[Outcome], stages: list[Stage], objectives: Objectives
) -> tuple[list[Summary], Summary]:
    """One summary per stage, by due time, and the total over the whole schedule."""
    per_stage = [
        summarize(
            (o for o in outcomes if o.stage == i),
            objectives,
            label=stage.label,
            start_s=stage.start_s,
            duration_s=stage.duration_s,
        )
        for i, stage in enumerate(stages)
    ]
    end_s = stages[-1].end_s if stages else 0.0
    total = summarize(outcomes, objectives, label="total", start_s=0.0, duration_s=end_s)
    return per_stage, total


def priority_summaries(
    outcomes: list[Outcome], duration_s: float, objectives: Objectives
) -> dict[str, Summary]:
    """A summary per priority sent ("none": the field was not sent); {} if none was sent."""
    values = {o.priority for o in outcomes}
    if values <= {None}:
        return {}
    summaries: dict[str, Summary] = {}
    for value in sorted(values, key=lambda v: -2 if v is None else v):
        name = "none" if value is None else _PRIORITY_NAMES[value]
        rows = (o for o in outcomes if o.priority == value)
        summaries[name] = summarize(
            rows, objectives, label=name, start_s=0.0, duration_s=duration_s
        )
    return summaries


MAX_ERROR_SAMPLES = 20


def error_samples(outcomes: list[Outcome]) -> list[dict[str, Any]]:
    """The first failed requests (at most ``MAX_ERROR_SAMPLES``), with what each was told:
    a count by kind says that something failed, these say why."""
    failed = (o for o in outcomes if verdict(o, Objectives()) is Verdict.ERROR)
    return [
        {"index": o.index, "sent_s": o.sent_s, "kind": o.kind.value, "status": o.status,
         "error": o.error}
        for o in itertools.islice(failed, MAX_ERROR_SAMPLES)
    ]  # fmt: skip


def results_document(
    facts: RunFacts, stages: list[Stage], outcomes: list[Outcome], objectives: Objectives
) -> dict[str, Any]:
    """Everything ``--out`` writes: config, per-stage and total summaries, per-second series."""
    per_stage, total = stage_summaries(outcomes, stages, objectives)
    end_s = stages[-1].end_s if stages else 0.0
    series: dict[str, Any] = time_series(outcomes, objectives, math.ceil(end_s))
    series["client_cpu_s"] = facts.cpu_s_by_second  # per second since the start, drain included
    document = {
        "config": facts.config,
        "model": facts.model,
        "started_at": datetime.fromtimestamp(facts.started_at, UTC).isoformat(),
        "wall_s": facts.wall_s,
        "client_cpu_s": facts.client_cpu_s,
        "client_procs": facts.client_procs,
        "stopped_early_s": facts.stopped_s,
        "objectives": {
            "ttft_ms": None if objectives.ttft_s is None else objectives.ttft_s * 1000,
            "tpot_ms": None if objectives.tpot_s is None else objectives.tpot_s * 1000,
        },
        "stage_boundaries_s": [s.start_s for s in stages] + [end_s],
        "stages": [dataclasses.asdict(s) for s in per_stage],
        "total": dataclasses.asdict(total),
        "by_priority": {
            name: dataclasses.asdict(s)
            for name, s in priority_summaries(outcomes, end_s, objectives).items()
        },
        "time_series": series,
        "server_metrics": {"before": facts.metrics_before, "after": facts.metrics_after},
        "error_samples": error_samples(outcomes),
    }
    return json_safe(document)  # type: ignore[no-any-return]  # a dict in, a dict out


_COLUMNS = (
    ("stage", 22),
    ("offered/s", 9),
    ("completed", 9),
    ("good/s", 8),
    ("good%", 6),
    ("shed", 6),
    ("errors", 6),
    ("shed ms p50/p99", 16),
    ("TTFT ms p50/p99", 16),
    ("TPOT ms p50/p99", 16),
)


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _pair(p50: float | None, p99: float | None) -> str:
    if p50 is None or not math.isfinite(p50):
        return "-"
    return f"{_num(p50, 0)}/{_num(p99, 0)}"


def _row(s: dict[str, Any]) -> str:
    cells = (
        str(s["label"])[:22],
        _num(s["offered_rps"]),
        str(s["num_completed"]),
        _num(s["good_rps"]),
        _num(s["good_pct"], 0),
        str(s["num_shed"]),
        str(s["num_errors"]),
        _pair(s["shed_latency_p50_ms"], s["shed_latency_p99_ms"]),
        _pair(s["ttft_p50_ms"], s["ttft_p99_ms"]),
        _pair(s["tpot_p50_ms"], s["tpot_p99_ms"]),
    )
    return "  ".join(
        c.ljust(w) if i == 0 else c.rjust(w)
        for i, (c, (_, w)) in enumerate(zip(cells, _COLUMNS, strict=True))
    )


def _kinds(counts: dict[str, int]) -> str:
    return " (" + ", ".join(f"{k} {n}" for k, n in counts.items()) + ")" if counts else ""


def _objectives_text(objectives: dict[str, float | None]) -> str:
    parts = [
        f"{name} <= {_num(objectives[key], 0)} ms"
        for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"))
        if objectives[key] is not None
    ]
    return (
        ", ".join(parts) + " (good = completed within them)" if parts else "none (good = completed)"
    )


def format_table(document: dict[str, Any]) -> str:
    """The summary table: a row per stage, a total row, then the run's facts."""
    header = "  ".join(n.ljust(w) if i == 0 else n.rjust(w) for i, (n, w) in enumerate(_COLUMNS))
    lines = [header, "-" * len(header)]
    lines += [_row(s) for s in document["stages"]]
    if len(document["stages"]) > 1:
        lines.append(_row(document["total"]))
    for name, s in document["by_priority"].items():
        lines.append(_row({**s, "label": f"priority {name}"}))
    total = document["total"]
    objectives = document["objectives"]
    wall_s = document["wall_s"] or 0.0
    cpu_s = document["client_cpu_s"] or 0.0
    lines += [
        "",
        f"model {document['model']}  objectives: {_objectives_text(objectives)}",
        f"offered {total['num_offered']}  good {total['num_good']}  "
        f"slo missed {total['num_slo_miss']}  shed {total['num_shed']}  "
        f"errors {total['num_errors']}{_kinds(total['errors_by_kind'])}  "
        f"aborted {total['num_aborted']}",
        f"wall {wall_s:.1f} s  client CPU {cpu_s:.1f} s over {document['client_procs']} "
        f"process(es) ({100 * cpu_s / max(wall_s, 1e-9):.0f}% of one core)  "
        f"send lag p99 {_num(total['send_lag_p99_ms'])} ms  "
        f"prompt tokens cached {_num(total['cached_prompt_pct'], 0)}%",
    ]
    if document["stopped_early_s"] is not None:
        lines.append(
            f"stopped early at {document['stopped_early_s']:.1f} s: rates are over the time run; "
            "requests then in flight count as aborted and are left out of good%"
        )
    return "\n".join(lines)
