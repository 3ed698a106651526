"""HTTP handlers: health, readiness and metrics. The placement service lives under an AppKey."""

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.router.placement import PlacementService

SERVICE = web.AppKey("service", PlacementService)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Ready: subscribed to the route queue and the KV and load feeds (the router's only
    registration: it is a member of the routers' queue group) and connected to NATS."""
    service = request.app[SERVICE]
    is_ready = service.is_started and service.is_connected
    body = {
        "ready": is_ready,
        "subscribed": service.is_started,
        "bus_connected": service.is_connected,
        "workers": len(service.workers),
        "models": len(service.cards),
    }
    return web.json_response(body, status=200 if is_ready else 503)


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[SERVICE].metrics.registry
    body = await asyncio.to_thread(generate_latest, registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(service: PlacementService) -> web.Application:
    app = web.Application()
    app[SERVICE] = service
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    return app
