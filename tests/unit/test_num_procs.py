"""How many frontend processes run by default: enough for the cores, and enough for the
connections each process's open-file limit can hold; with a TTFT objective, the cores
alone."""

import os

import pytest

from services.launcher.config import UpConfig
from shared.lifecycle import (
    DEFAULT_NUM_CONNECTIONS,
    MAX_DEFAULT_PROCS,
    default_num_procs,
    fd_hard_limit,
    num_procs_for,
)
from shared.slo import SLOConfig


@pytest.mark.parametrize(
    ("num_cpus", "fd_limit", "expected"),
    [
        (1, 0, 2),  # at least 2, limit unknown
        (2, 0, 2),
        (6, 0, 6),  # one per core
        (64, 0, 8),  # at most 8
        (2, 1_048_576, 2),  # a high limit adds nothing
        (16, 1_048_576, 8),
        (2, 65_536, 2),  # 49,152 a process: one would do, cores decide
    ],
)
def test_cores_decide_when_files_are_plenty(num_cpus, fd_limit, expected):
    assert num_procs_for(num_cpus, fd_limit) == expected


def test_a_low_file_limit_adds_processes_on_a_small_machine():
    # This machine: 2 cores, 20,000 files a process. 15,000 connections counted a process:
    # 50,000 need 4.
    assert num_procs_for(2, 20_000) == 4
    assert num_procs_for(4, 20_000) == 4
    assert num_procs_for(6, 20_000) == 6  # cores ask for more: cores win
    assert num_procs_for(2, 20_000, num_connections=10_000) == 2


def test_every_default_process_keeps_headroom_below_its_file_limit():
    for fd_limit in (8_192, 16_384, 20_000, 32_768, 65_536):
        num_procs = num_procs_for(2, fd_limit)
        if num_procs < MAX_DEFAULT_PROCS:
            per_proc = DEFAULT_NUM_CONNECTIONS / num_procs
            assert per_proc <= 0.75 * fd_limit, (fd_limit, num_procs)


def test_the_count_is_capped_where_no_count_would_do():
    assert num_procs_for(2, 1024) == MAX_DEFAULT_PROCS
    assert num_procs_for(2, 1) == MAX_DEFAULT_PROCS


def test_this_machine_gets_a_count_from_its_own_limits():
    num_procs = default_num_procs()
    assert 2 <= num_procs <= MAX_DEFAULT_PROCS
    assert fd_hard_limit() >= 0


def test_with_objectives_the_cores_alone_decide():
    by_cores = num_procs_for(os.cpu_count() or 1, 0)
    assert default_num_procs(sheds=True) == by_cores
    assert default_num_procs(sheds=False) == num_procs_for(os.cpu_count() or 1, fd_hard_limit())


def test_baton_up_starts_fewer_frontends_only_when_it_sheds():
    shedding = UpConfig(slo=SLOConfig(slo_ttft_ms=2000)).cluster_spec()
    queueing = UpConfig().cluster_spec()
    assert shedding.num_frontends == default_num_procs(sheds=True)
    assert queueing.num_frontends == default_num_procs()
    assert (
        UpConfig(num_frontends=3, slo=SLOConfig(slo_ttft_ms=2000)).cluster_spec().num_frontends == 3
    )
