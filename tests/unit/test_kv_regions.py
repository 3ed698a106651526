"""Pure range arithmetic of the KV transfer layer: coalescing, coverage, batching."""

from shared.kv_transfer.metadata import RegionDesc
from shared.kv_transfer.regions import RegionSet, coalesce, split


def test_coalesce_merges_runs_contiguous_on_both_sides():
    transfers = [(300, 30, 100), (100, 10, 100), (200, 110, 100), (400, 500, 100)]
    assert coalesce(transfers) == [(100, 10, 200), (300, 30, 100), (400, 500, 100)]


def test_region_set_covers_across_touching_registrations():
    regions = RegionSet([RegionDesc(0, 100), RegionDesc(200, 50), RegionDesc(100, 100)])
    assert regions.covers(50, 200)
    assert not regions.covers(240, 20)
    assert not regions.covers(-1, 1)


def test_split_bounds_each_batch():
    batches = split([(0, 0, 10), (100, 100, 3)], 4)
    assert [sum(n for *_, n in batch) for batch in batches] == [4, 4, 4, 1]
    assert batches[2] == [(8, 8, 2), (100, 100, 2)]
