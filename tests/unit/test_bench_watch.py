from services.bench.endpoint import MetricsWatcher, parse_samples


def test_parse_samples_keeps_the_named_metrics_with_their_labels():
    lines = [
        'baton_planner_actual_workers{role="decode"} 2.0',
        'baton_planner_actual_workers{role="prefill"} 1.0',
        'baton_planner_desired_workers{role="decode"} 3.0',
        "baton_planner_actual_workers_other 9.0",
        "baton_planner_actual_workers nan-ish",
    ]
    assert parse_samples(lines, ("baton_planner_actual_workers",)) == {
        'baton_planner_actual_workers{role="decode"}': 2.0,
        'baton_planner_actual_workers{role="prefill"}': 1.0,
    }


def test_watcher_series_line_up_with_the_samples_and_mark_gaps():
    watcher = MetricsWatcher("http://unused", ("m",))
    watcher.at = [100.0, 101.0, 102.0]
    watcher.samples = [{'m{role="a"}': 1.0}, {'m{role="a"}': 2.0, 'm{role="b"}': 1.0}, {}]
    assert watcher.times_s(99.5) == [0.5, 1.5, 2.5]
    assert watcher.series() == {'m{role="a"}': [1.0, 2.0, None], 'm{role="b"}': [None, 1.0, None]}
