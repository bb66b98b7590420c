"""The HTTP endpoint: Prometheus metrics (``GET /metrics``) and liveness (``GET /healthz``).

Served by aiohttp on the event loop; a scrape renders the counters the shell keeps anyway
(:mod:`sipguard.ops.metrics`), so an unscraped sipguard pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from sipguard.ops.metrics import Metrics, MetricsCollector


class HttpEndpoint:
    """One aiohttp site; :meth:`start` binds it (raises OSError), :meth:`stop` closes it."""

    def __init__(self, metrics: Metrics, gauges: Callable[[], dict[str, float]]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(MetricsCollector(metrics, gauges))
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> None:
        registry = self.registry

        async def metrics(request: web.Request) -> web.Response:
            body = generate_latest(registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        async def healthz(request: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
