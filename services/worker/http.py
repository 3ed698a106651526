"""The worker's HTTP side: ``/health`` (the event loop answers), ``/ready`` (registered, not
draining, connected to NATS, and the engine serves: a recent step or a one-token canary, see
``canary``) and ``/metrics`` (what the shell and its role count), for probes and scrapes."""

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from proto.messages import WorkerRole
from services.worker.canary import CanaryResult
from services.worker.shell import WorkerShell

logger = logging.getLogger(__name__)

SHELL = web.AppKey("shell", WorkerShell)
REGISTRY = web.AppKey("registry", CollectorRegistry)

# What the roles count (``Role.counters``), summed over every role the worker has had.
_ROLE_COUNTERS = (
    ("baton_worker_remote_prefills", "prompts prefilled on a prefill worker and pulled here"),
    ("baton_worker_prefill_fallbacks", "handoffs that failed and were prefilled here instead"),
    (
        "baton_worker_moved_in",
        "streams moved here live from a worker that drained or changed role, their KV read",
    ),
    (
        "baton_worker_moved_in_blocks",
        "KV blocks those moves read (blocks cached here already are not read)",
    ),
    ("baton_worker_moved_in_bytes", "KV bytes those moves read"),
    (
        "baton_worker_moved_out",
        "streams this worker gave up while draining or changing role (with their KV or without)",
    ),
    ("baton_worker_lent_kv_blocks", "KV blocks held for peers that streams moved to"),
    (
        "baton_worker_finished_requests",
        "requests that finished here with output tokens (their length is the planner's)",
    ),
    ("baton_worker_finished_output_tokens", "the output tokens of those requests"),
    ("baton_worker_hold_timeouts", "held prompts no decode worker read in time"),
    ("baton_worker_prefills_served", "prompts computed here for a decode worker (PrefillDone)"),
)


def worker_registry(shell: WorkerShell) -> CollectorRegistry:
    """Gauges read from the shell when scraped (no cost on the request path)."""
    registry = CollectorRegistry()

    def gauge(name: str, text: str, read: Callable[[], float]) -> None:
        Gauge(name, text, registry=registry).set_function(read)

    objectives = shell.objectives
    canary = shell.canary
    gauge("baton_worker_running", "sequences in the batch", lambda: shell.loop.stats().num_running)
    gauge("baton_worker_waiting", "sequences queued", lambda: shell.loop.stats().num_waiting)
    gauge("baton_worker_kv_usage", "KV cache in use (0..1)", lambda: shell.loop.stats().kv_usage)
    gauge("baton_worker_in_flight", "requests owed an answer", lambda: shell.num_in_flight)
    gauge("baton_worker_steps", "engine steps so far", lambda: shell.loop.num_steps)
    gauge("baton_worker_bad_messages", "undecodable inbox messages", lambda: shell.num_bad_messages)
    gauge(
        "baton_worker_delivery_failures",
        "steps whose outputs could not be delivered",
        lambda: shell.num_delivery_failures,
    )
    gauge(
        "baton_worker_shed_at_admission",
        "requests refused because their first token could not come in time",
        lambda: objectives.num_shed_at_admission,
    )
    gauge(
        "baton_worker_step_base_seconds",
        "measured fixed cost of a step",
        lambda: objectives.speed_model.speed.base_s,
    )
    gauge(
        "baton_worker_step_per_token_seconds",
        "measured cost of one prefilled token",
        lambda: objectives.speed_model.speed.per_token_s,
    )
    gauge(
        "baton_worker_reserved",
        "requests waiting for their KV from a prefill worker",
        lambda: shell.loop.stats().num_reserved,
    )
    gauge(
        "baton_worker_waiting_tokens",
        "prompt tokens queued for prefill",
        lambda: shell.loop.stats().num_waiting_tokens,
    )
    gauge(
        "baton_worker_handoffs",
        "requests whose KV is on its way from a prefill worker",
        lambda: shell.num_handoffs,
    )
    gauge(
        "baton_worker_step_per_seq_seconds",
        "measured cost of one decoding sequence in a step",
        lambda: objectives.speed_model.speed.per_seq_s,
    )
    gauge(
        "baton_worker_last_step_age_seconds",
        "time since the engine last completed a step (NaN: it never has)",
        lambda: math.nan if canary.last_step_s is None else time.monotonic() - canary.last_step_s,
    )
    gauge("baton_worker_canaries", "canary requests run for /ready", lambda: canary.num_canaries)
    gauge("baton_worker_canary_failures", "canaries that failed", lambda: canary.num_failures)
    gauge(
        "baton_worker_log_lines_suppressed",
        "warnings left out by rate limiting",
        lambda: shell.log.num_suppressed,
    )
    gauge("baton_worker_draining", "1 while draining", lambda: float(shell.is_draining))
    for name, text in _ROLE_COUNTERS:
        gauge(name, text, functools.partial(shell.roles.count, name))
    switcher = shell.switcher
    if switcher is not None:
        gauge(
            "baton_worker_role_switches",
            "role switches done (RoleSwitch; a worker changes role in place)",
            lambda: switcher.num_switches,
        )
        gauge(
            "baton_worker_role_switch_seconds",
            "the last role switch: command received to registered under the new role (NaN: none)",
            lambda: math.nan if switcher.last_switch_s is None else switcher.last_switch_s,
        )
        gauge(
            "baton_worker_role_switch_refusals",
            "role switches refused (draining, another under way, the last decode worker, ...)",
            lambda: switcher.num_refused,
        )
        gauge(
            "baton_worker_is_prefill",
            "1 while the worker serves as a prefill worker, 0 as a decode worker",
            lambda: float(shell.role.kind is WorkerRole.PREFILL),
        )
    return registry


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    shell = request.app[SHELL]
    is_serving = shell.is_registered and not shell.is_draining
    canary = await shell.canary.check() if is_serving else CanaryResult(False, "not serving")
    is_ready = is_serving and shell.bus.is_connected and canary.is_ok
    body = {
        "ready": is_ready,
        "registered": shell.is_registered,
        "draining": shell.is_draining,
        "bus_connected": shell.bus.is_connected,
        "engine": {"ok": canary.is_ok, "how": canary.how, "detail": canary.detail},
        "role": shell.role.kind.name.lower(),
    }
    return web.json_response(body, status=200 if is_ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = await asyncio.to_thread(generate_latest, request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@contextlib.asynccontextmanager
async def http_server(shell: WorkerShell, host: str, port: int) -> AsyncIterator[int | None]:
    """Serve the endpoints for the duration of the block; yields the port (None: port -1)."""
    if port < 0:
        yield None
        return
    app = web.Application()
    app[SHELL] = shell
    app[REGISTRY] = worker_registry(shell)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        logger.info("worker http ready url=http://%s:%d/ready", host, bound)
        yield int(bound)
    finally:
        await runner.cleanup()
