"""The results document as a PNG: request rates over time, and latencies over time.

matplotlib is an optional extra (``pip install 'baton[bench]'``), imported only here and
only when a plot is asked for.
"""

import importlib
import importlib.util
import math
from typing import Any

INSTALL_HINT = "--plot needs matplotlib: pip install 'baton[bench]' (or pip install matplotlib)"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def check_available() -> None:
    """Raise ``PlotUnavailable`` before a run whose plot could not be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        raise PlotUnavailable(INSTALL_HINT)


def _values(series: list[float | None]) -> list[float]:
    return [math.nan if v is None else v for v in series]


def draw(document: dict[str, Any], path: str) -> None:
    """Panels sharing the time axis: offered / good / shed (and errors) req/s with the
    stage boundaries; TTFT and TPOT p50/p99 on a log scale with the objectives dashed; and,
    when the run watched a /metrics endpoint, the sampled gauges (workers per role, say)."""
    try:
        # By name: mypy then checks this module the same with or without the extra installed.
        matplotlib = importlib.import_module("matplotlib")
    except ImportError as exc:
        raise PlotUnavailable(INSTALL_HINT) from exc
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")

    series = document["time_series"]
    edges = [*series["t_s"], len(series["t_s"])]  # each count fills its second
    t_s = [t + 0.5 for t in series["t_s"]]  # each percentile sits mid-second
    watched = document.get("watched")
    if watched and watched["series"]:
        fig, (rates, latency, server) = plt.subplots(
            3, 1, figsize=(12, 10), sharex=True, height_ratios=(3, 3, 2)
        )
    else:
        fig, (rates, latency) = plt.subplots(2, 1, figsize=(12, 7.5), sharex=True)
        server = None
    try:
        if server is not None and watched:
            for name, values in watched["series"].items():
                server.step(watched["t_s"], _values(values), where="post", label=name)
            for start_s in document["stage_boundaries_s"]:
                server.axvline(start_s, color="grey", linestyle=":", linewidth=1)
            server.set_ylabel("server (sampled)")
            server.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
            server.grid(alpha=0.3)
        rates.stairs(
            series["offered"], edges, label="offered", color="tab:blue", alpha=0.35, linewidth=4
        )
        for name, color, is_always in (
            ("good", "tab:green", True),
            ("shed", "tab:orange", True),
            ("slo_miss", "tab:purple", False),
            ("errors", "tab:red", False),
        ):
            if is_always or any(series[name]):
                label = name.replace("_", " ")
                rates.stairs(series[name], edges, label=label, color=color, linewidth=1.5)
        rates.set_ylabel("requests/s (by due second)")
        for start_s, stage in zip(document["stage_boundaries_s"], document["stages"], strict=False):
            rates.axvline(start_s, color="grey", linestyle=":", linewidth=1)
            rates.annotate(
                stage["label"],
                (start_s, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(3, -12),
                textcoords="offset points",
                fontsize=8,
                color="grey",
            )
        rates.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
        rates.grid(alpha=0.3)

        for key, label, color in (
            ("ttft", "TTFT", "tab:purple"),
            ("tpot", "TPOT", "tab:brown"),
        ):
            for q, style in (("p50", "-"), ("p99", "--")):
                values = _values(series[f"{key}_{q}_ms"])
                if any(not math.isnan(v) for v in values):
                    latency.plot(
                        t_s,
                        values,
                        style,
                        color=color,
                        label=f"{label} {q}",
                        alpha=0.9,
                        marker=".",
                        markersize=4,
                    )
            objective = document["objectives"][f"{key}_ms"]
            if objective is not None:
                latency.axhline(
                    objective,
                    color=color,
                    linestyle=(0, (6, 4)),
                    linewidth=1.2,
                    label=f"{label} objective",
                )
        for start_s in document["stage_boundaries_s"]:
            latency.axvline(start_s, color="grey", linestyle=":", linewidth=1)
        if latency.lines:
            latency.set_yscale("log")
        latency.set_ylabel("ms (log)")
        (latency if server is None else server).set_xlabel("seconds since start")
        latency.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
        latency.grid(alpha=0.3, which="both")
        fig.suptitle(f"baton-bench: {document['model']}", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
