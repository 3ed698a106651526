"""bench/overload.py's sheds by kind and stage, from the frontends' counters sampled once a
second (``--watch-sheds``)."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "overload.py"
_spec = importlib.util.spec_from_file_location("bench_overload", SCRIPT)
assert _spec is not None
assert _spec.loader is not None
overload = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(overload)

UNREAD = 'baton_frontend_overload_sheds_total{where="connection"}'
UNREAD_HANDLER = 'baton_frontend_overload_sheds_total{where="handler"}'
CHECKED = 'baton_frontend_shed_seconds_count{model="m",stage="frontend"}'


def _result(series: dict[str, list[float | None]]) -> dict[str, object]:
    return {
        "stages": [
            {"label": "1x", "start_s": 0.0, "duration_s": 2.0},
            {"label": "4x", "start_s": 2.0, "duration_s": 3.0},
        ],
        "watched": {"t_s": [0.1, 1.0, 2.1, 3.0, 4.0, 4.9], "series": series},
    }


def test_counts_each_kind_between_the_samples_nearest_each_stages_edges():
    result = _result(
        {
            UNREAD: [0, 0, 5, 50, 90, 100],
            UNREAD_HANDLER: [None, None, 1, 2, 3, 4],  # appears with its first count
            CHECKED: [None, 2, 3, 30, 60, 70],
        }
    )
    assert overload.sheds_by_stage(result) == [
        ("1x", {"unread": 6.0, "frontend": 3.0}),
        ("4x", {"unread": 98.0, "frontend": 67.0}),
    ]


def test_nothing_without_watched_samples():
    assert overload.sheds_by_stage({"stages": [], "time_series": {}}) == []
    assert overload.sheds_by_stage(_result({}) | {"watched": {"t_s": [], "series": {}}}) == []
