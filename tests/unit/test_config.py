"""Flags and env vars derived from config dataclasses: one name, three spellings."""

from dataclasses import dataclass, field

import pytest

from services.frontend.config import FrontendConfig
from services.launcher.config import UpConfig
from services.worker.config import WorkerServiceConfig
from shared.config import load_config
from shared.engine.config import EngineConfig, WorkerConfig
from shared.slo import SLOConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class ExampleConfig:
    max_num_seqs: int = field(default=8, metadata={"help": "batch size"})
    nats_url: str = "nats://default"
    speedup: float = 1.0
    is_verbose: bool = False
    note: str | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


def test_defaults_when_nothing_is_set():
    assert load_config(ExampleConfig, "svc", [], env={}) == ExampleConfig()


def test_flag_beats_service_env_beats_global_env():
    env = {"BATON_SVC_MAX_NUM_SEQS": "16", "BATON_MAX_NUM_SEQS": "32", "BATON_NATS_URL": "nats://g"}
    assert load_config(ExampleConfig, "svc", [], env=env).max_num_seqs == 16
    assert load_config(ExampleConfig, "svc", ["--max-num-seqs", "4"], env=env).max_num_seqs == 4
    assert load_config(ExampleConfig, "svc", [], env=env).nats_url == "nats://g"
    del env["BATON_SVC_MAX_NUM_SEQS"]
    assert load_config(ExampleConfig, "svc", [], env=env).max_num_seqs == 32


def test_types_are_converted_from_text():
    env = {"BATON_SVC_SPEEDUP": "2.5", "BATON_SVC_IS_VERBOSE": "yes", "BATON_SVC_NOTE": "hi"}
    config = load_config(ExampleConfig, "svc", [], env=env)
    assert (config.speedup, config.is_verbose, config.note) == (2.5, True, "hi")
    assert load_config(ExampleConfig, "svc", ["--is-verbose", "false"], env={}).is_verbose is False


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--max-num-seqs", "many"], {}, "--max-num-seqs"),
        ([], {"BATON_SVC_MAX_NUM_SEQS": "many"}, "BATON_SVC_MAX_NUM_SEQS"),
        ([], {"BATON_SVC_IS_VERBOSE": "maybe"}, "BATON_SVC_IS_VERBOSE"),
        (["--max-num-seqs", "0"], {}, "max_num_seqs must be >= 1"),
    ],
)
def test_bad_values_exit_with_a_usage_error_naming_the_setting(argv, env, named, capsys):
    with pytest.raises(SystemExit) as info:
        load_config(ExampleConfig, "svc", argv, env=env)
    assert info.value.code == 2
    assert named in capsys.readouterr().err


def test_worker_settings_reject_bad_namespace_and_engine():
    with pytest.raises(ValueError, match="namespace"):
        WorkerConfig(namespace="a.b")
    with pytest.raises(ValueError, match="engine"):
        EngineConfig(engine="gpu-magic")


def test_decode_flags_reach_nested_worker_and_engine_settings():
    config = load_config(
        WorkerServiceConfig,
        "decode",
        ["--engine", "torch", "--max-waiting", "7"],
        env={"BATON_NAMESPACE": "ns1", "BATON_DECODE_BLOCK_SIZE": "32"},
    )
    assert config.engine.engine == "torch"
    assert config.engine.block_size == 32
    assert config.worker.max_waiting == 7
    assert config.worker.namespace == "ns1"


@dataclass(frozen=True, slots=True, kw_only=True)
class InnerConfig:
    block_size: int = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class OuterConfig:
    inner: InnerConfig = field(default_factory=InnerConfig)
    name: str = "x"


def test_nested_config_fields_are_flattened_into_flags_and_env():
    config = load_config(OuterConfig, "svc", ["--block-size", "32"], env={"BATON_NAME": "y"})
    assert config == OuterConfig(inner=InnerConfig(block_size=32), name="y")


def test_niceness_settings_stay_within_what_the_kernel_takes():
    with pytest.raises(ValueError, match="nice"):
        FrontendConfig(nice=20)
    with pytest.raises(ValueError, match="frontend_nice"):
        UpConfig(frontend_nice=-2)
    with pytest.raises(ValueError, match="frontend_nice"):
        UpConfig(frontend_nice=20)
    # baton up hands its setting to the frontends; they apply it once, at start.
    assert UpConfig(frontend_nice=3).cluster_spec().frontend_args == ("--nice", "3")


def test_the_frontends_yield_to_the_engines_only_without_a_ttft_objective():
    # By default (-1): 5 without objectives, 0 with a TTFT objective; a setting wins.
    assert UpConfig().cluster_spec().frontend_args == ("--nice", "5")
    tpot_only = SLOConfig(slo_tpot_ms=100)
    assert UpConfig(slo=tpot_only).cluster_spec().frontend_args == ("--nice", "5")
    ttft = SLOConfig(slo_ttft_ms=2000, slo_tpot_ms=100)
    assert UpConfig(slo=ttft).cluster_spec().frontend_args == ("--nice", "0")
    assert UpConfig(slo=ttft, frontend_nice=5).cluster_spec().frontend_args == ("--nice", "5")
    assert UpConfig(frontend_nice=0).cluster_spec().frontend_args == ("--nice", "0")


def test_baton_up_refuses_a_floor_on_the_total_above_its_cap():
    # Refused before any process starts, not by the planner once the cluster is up.
    with pytest.raises(ValueError, match="min_total_workers"):
        UpConfig(planner=True, max_total_workers=2, min_total_workers=3).cluster_spec()
