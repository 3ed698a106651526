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


def test_the_lag_series_is_no_kind_of_shed_and_its_worst_sample_per_stage_is_kept():
    lag_a = 'baton_frontend_loop_lag_seconds{pid="1"}'
    lag_b = 'baton_frontend_loop_lag_seconds{pid="2"}'
    result = _result(
        {
            UNREAD: [0, 0, 5, 50, 90, 100],
            lag_a: [0.001, 0.002, 0.030, 0.010, None, 0.004],
            lag_b: [None, 0.003, 0.001, 0.050, 0.020, 0.001],
        }
    )
    assert [kinds for _, kinds in overload.sheds_by_stage(result)] == [
        {"unread": 5.0},
        {"unread": 95.0},
    ]
    # 1x holds the samples at 0.1 and 1.0 s; 4x those at 2.1 to 4.9 s.
    assert overload.lag_by_stage(result) == [0.003, 0.050]
    assert overload.lag_by_stage(_result({})) == [None, None]
