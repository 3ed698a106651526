"""One ``/metrics`` for the processes of one frontend (``--procs N``).

A scrape reaches whichever process the kernel gives the connection to, so each must answer
for all of them. Each process keeps its own registry in memory (a counter increment stays a
plain addition on the token path) and writes a snapshot of it to a directory it shares with
its siblings every second; the process scraped adds its own current values to the others'
snapshots, sample by sample. Counters, histograms and gauges that count things add up; the
goodput ratio is recomputed from the summed window counts. A snapshot is at most
``SNAPSHOT_INTERVAL_S`` old. The parent removes the snapshot of a process that exited (its
counters then restart from zero in the sum, which Prometheus's ``rate`` reads as a reset).
"""

import math
import os
from collections import defaultdict
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

SNAPSHOT_INTERVAL_S = 1.0
SUFFIX = ".prom"
RATIO = "baton_frontend_goodput_ratio"
WINDOW = "baton_frontend_goodput_window_requests"

Labels = tuple[tuple[str, str], ...]


def snapshot_path(directory: str, pid: int) -> Path:
    return Path(directory) / f"{pid}{SUFFIX}"


def write_snapshot(registry: CollectorRegistry, directory: str) -> None:
    """Write this process's registry where its siblings read it (atomically)."""
    path = snapshot_path(directory, os.getpid())
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(generate_latest(registry))
    tmp.replace(path)


def merged_metrics(registry: CollectorRegistry, directory: str) -> bytes:
    """This process's registry now, plus every sibling's last snapshot, in the text format."""
    texts = [generate_latest(registry).decode()]
    own = snapshot_path(directory, os.getpid())
    for path in sorted(Path(directory).glob(f"*{SUFFIX}")):
        if path != own:
            try:
                texts.append(path.read_text())
            except FileNotFoundError:  # removed since the listing: that process exited
                continue
    return merge(texts).encode()


def merge(texts: list[str]) -> str:
    """Sum samples with the same name and labels across expositions; recompute the goodput
    ratio from the summed window counts."""
    kinds: dict[str, tuple[str, str]] = {}  # family -> (type, help), first seen order
    sums: dict[str, dict[tuple[str, Labels], float]] = defaultdict(dict)
    for text in texts:
        for family in text_string_to_metric_families(text):
            kinds.setdefault(family.name, (family.type, family.documentation))
            values = sums[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                values[key] = values.get(key, 0.0) + sample.value
    if RATIO in sums:
        sums[RATIO] = _ratios(sums.get(WINDOW, {}))
    lines: list[str] = []
    for name, (kind, help_text) in kinds.items():
        lines.append(f"# HELP {name} {_escape_help(help_text)}")
        lines.append(f"# TYPE {name} {kind}")
        for (sample_name, labels), value in sums[name].items():
            lines.append(f"{sample_name}{_labels(labels)} {_number(value)}")
    return "\n".join(lines) + "\n"


def _ratios(window: dict[tuple[str, Labels], float]) -> dict[tuple[str, Labels], float]:
    good: dict[str, float] = defaultdict(float)
    total: dict[str, float] = defaultdict(float)
    for (_, labels), value in window.items():
        by_name = dict(labels)
        model = by_name.get("model", "")
        total[model] += value
        if by_name.get("outcome") == "good":
            good[model] += value
    return {
        (RATIO, (("model", model),)): good[model] / n if n else 1.0 for model, n in total.items()
    }


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape_value(v)}"' for k, v in labels)
    return "{" + inner + "}"


def _escape_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")
