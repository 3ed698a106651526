"""One benchmark run: plan the requests, run the client processes, build the results."""

import asyncio
import contextlib
import dataclasses
import logging
import random
from pathlib import Path
from typing import Any

from services.bench.arrivals import (
    Stage,
    arrival_times,
    build_stages,
    parse_stages,
    stage_at,
    truncate,
)
from services.bench.client import Share
from services.bench.config import BenchConfig
from services.bench.endpoint import MetricsWatcher, first_model, scrape_metrics
from services.bench.outcome import Objectives
from services.bench.pool import run_clients
from services.bench.report import RunFacts, results_document
from services.bench.workload import (
    RequestPlan,
    load_trace,
    parse_priority_mix,
    plan_synthetic,
    plan_trace,
    scale,
    window,
)

logger = logging.getLogger(__name__)


def plan_trace_run(config: BenchConfig) -> tuple[list[Stage], list[RequestPlan]]:
    """The trace's window, scaled, as one stage named after the file."""
    rows = window(
        load_trace(config.trace, config.trace_format), config.trace_start_s, config.trace_duration_s
    )
    rows = scale(
        rows,
        time_scale=config.time_scale,
        length_scale=config.length_scale,
        max_prompt_tokens=config.max_prompt_tokens,
        max_output_tokens=config.max_output_tokens,
    )
    if not rows:
        raise ValueError(
            f"no request in {config.trace} from {config.trace_start_s} s "
            f"for {config.trace_duration_s or 'all remaining'} s"
        )
    if config.trace_duration_s > 0:
        duration_s = config.trace_duration_s / config.time_scale
    else:
        duration_s = max(rows[-1].arrival_s, 1.0)
    rate = len(rows) / duration_s
    stage = Stage(Path(config.trace).stem, 0.0, duration_s, rate, rate)
    return [stage], plan_trace(rows, parse_priority_mix(config.priority_mix), config.seed)


def plan_run(config: BenchConfig) -> tuple[list[Stage], list[RequestPlan]]:
    """The schedule's stages and every request, in due order."""
    if config.trace:
        return plan_trace_run(config)
    rates = parse_stages(config.stages) or [(config.rate, config.duration_s)]
    stages = build_stages(rates, config.ramp_s)
    rng = random.Random(f"{config.seed}/arrivals")
    due_s = arrival_times(stages, config.arrival, config.burstiness, rng)
    plans = plan_synthetic(
        due_s,
        [stage_at(stages, t) for t in due_s],
        prompt_tokens=config.prompt_tokens,
        output_tokens=config.output_tokens,
        prefix_tokens=config.prefix_tokens,
        priority_mix=parse_priority_mix(config.priority_mix),
        seed=config.seed,
    )
    return stages, plans


async def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run the benchmark the config describes; returns the results document."""
    stages, plans = plan_run(config)
    if not plans:
        raise ValueError("the schedule has no arrivals: raise --rate or --duration-s")
    model = config.model or await first_model(config.url)
    prompt_seed = config.prompt_seed
    if prompt_seed is None:
        prompt_seed = random.SystemRandom().randrange(2**31)
    objectives = Objectives.from_ms(config.slo_ttft_ms, config.slo_tpot_ms)
    logger.info(
        "run planned model=%s num_requests=%d num_stages=%d", model, len(plans), len(stages)
    )
    shares = [
        Share(
            url=config.url,
            model=model,
            seed=prompt_seed,
            plans=plans[i :: config.client_procs],
            objectives=objectives,
            send_slo=config.send_slo,
            shed_statuses=config.shed_status_codes(),
            request_timeout_s=config.request_timeout_s,
        )
        for i in range(config.client_procs)
    ]
    metrics_before = await scrape_metrics(config.metrics_url) if config.metrics_url else []
    watcher = None
    if config.watch_url:
        names = tuple(n.strip() for n in config.watch.split(",") if n.strip())
        watcher = MetricsWatcher(config.watch_url, names)
    async with asyncio.TaskGroup() as tg:
        watching = None
        if watcher is not None:
            watching = tg.create_task(watcher.run(), name="watch")
        try:
            result = await run_clients(shares, stages, show=not config.quiet)
        finally:
            if watching is not None:
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watching
    metrics_after = await scrape_metrics(config.metrics_url) if config.metrics_url else []
    if result.stopped_s is not None:
        logger.warning("run stopped early at_s=%.1f", result.stopped_s)
        stages = truncate(stages, result.stopped_s)
    facts = RunFacts(
        config=dataclasses.asdict(dataclasses.replace(config, prompt_seed=prompt_seed)),
        model=model,
        started_at=result.started_at,
        wall_s=result.wall_s,
        client_cpu_s=result.client_cpu_s,
        client_procs=config.client_procs,
        cpu_s_by_second=result.cpu_s_by_second,
        metrics_before=metrics_before,
        metrics_after=metrics_after,
        stopped_s=result.stopped_s,
    )
    document = results_document(facts, stages, result.outcomes, objectives)
    if watcher is not None:
        document["watched"] = {
            "url": watcher.url,
            "t_s": watcher.times_s(result.started_at),
            "series": watcher.series(),
        }
    return document
