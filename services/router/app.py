"""HTTP handlers: health, readiness and metrics. The placement service lives under an AppKey."""

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.router.placement import PlacementService

SERVICE = web.AppKey("service", PlacementService)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    # The site starts only once the service is subscribed: serving HTTP means ready.
    return web.json_response({"status": "ok"})


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
