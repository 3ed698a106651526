"""HTTP handlers: health, readiness and metrics. The planner lives under an AppKey."""

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.planner.planner import Planner
from shared.bus import Bus

PLANNER = web.AppKey("planner", Planner)
BUS = web.AppKey("bus", Bus)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Ready: subscribed to the load reports, following the directory, connected to NATS."""
    planner = request.app[PLANNER]
    is_connected = request.app[BUS].is_connected
    is_ready = planner.is_started and is_connected
    body = {
        "ready": is_ready,
        "bus_connected": is_connected,
        "workers": len(planner.observer.workers),
        "desired": {role.value: d.desired for role, d in planner.last_decisions.items()},
        "reasons": {role.value: d.reason for role, d in planner.last_decisions.items()},
    }
    return web.json_response(body, status=200 if is_ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = await asyncio.to_thread(generate_latest, request.app[PLANNER].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(planner: Planner, bus: Bus) -> web.Application:
    app = web.Application()
    app[PLANNER] = planner
    app[BUS] = bus
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    return app
