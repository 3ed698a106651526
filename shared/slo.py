"""Service-level objectives, as configuration: one declaration shared by every service that
has them (the frontend, the workers, ``baton up``), so that one flag and one variable,
``--slo-ttft-ms`` / ``BATON_SLO_TTFT_MS``, means the same everywhere."""

from dataclasses import dataclass, field

from shared.config import doc


@dataclass(frozen=True, slots=True, kw_only=True)
class SLOConfig:
    """The objectives (0: none) and how close to the TTFT objective admission may plan."""

    slo_ttft_ms: float = field(
        default=0.0,
        metadata=doc(
            "time-to-first-token objective (0: none): a request no worker can serve within "
            "it gets 429 with Retry-After at once, and one still waiting past it is shed"
        ),
    )
    slo_tpot_ms: float = field(
        default=0.0,
        metadata=doc(
            "time-per-output-token objective (0: none): workers cap their batch and the "
            "prompt tokens prefilled per step so that a step, as measured, stays within it"
        ),
    )
    slo_admit_fraction: float = field(
        default=0.25,
        metadata=doc(
            "admit a request only if its predicted time to first token is within this "
            "fraction of its TTFT objective (the rest absorbs prediction error and bursts)"
        ),
    )

    def __post_init__(self) -> None:
        for name in ("slo_ttft_ms", "slo_tpot_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: none), got {getattr(self, name)}")
        if not 0 < self.slo_admit_fraction <= 1:
            raise ValueError(f"slo_admit_fraction must be in (0, 1], got {self.slo_admit_fraction}")

    @property
    def ttft_s(self) -> float | None:
        return self.slo_ttft_ms / 1000.0 if self.slo_ttft_ms > 0 else None

    @property
    def tpot_s(self) -> float | None:
        return self.slo_tpot_ms / 1000.0 if self.slo_tpot_ms > 0 else None
